"""A small fidelity table: a cost model fitted on one live run predicts a live run of another configuration.

The embedded model on the CPU. A pipeline with default settings serves a Poisson workload at
``RATE``, and a cost model is fitted on its trace. A pipeline with a smaller token budget
(``BUDGET`` tokens a step, so each prompt is read in chunks over several steps) serves
another workload at the same rate, at the same time (see ``runs``), and its recorded
arrivals are simulated under its settings with that cost model (five seeds, the median).
The prediction must come within:

- output throughput: 20%. At this load throughput follows the arrivals, so this mostly
  checks that every request is served, and at the pace it arrived (a stall during the last
  requests stretches a live run's end);
- TTFT p50 and ITL p50: a factor of ``LATENCY_TOLERANCE`` either way (1.5: -33% to +50%).
  Not the 10% of a quiet machine: on a 2-core box that other processes share, the same
  configuration's ITL p50 moves by up to 2x between live runs a minute apart (the steps slow
  down in patches when another process takes the cores; docs/benchmarks.md), and a test that
  fails on the machine's mood tests nothing. A factor of 1.5 still catches what a simulation
  gets wrong by construction: a cost model three times too slow misses ITL p50 by about 3x
  and fails the same check (the last test);
- preemptions: the same (none: the default pool holds every request);
- prefix-hit rate: within 0.03 (the policies are the real ones; only timing moves a hit).

The same rate, not a higher one: a cost model fitted on a busy shared box overstates what
one more request costs a step (slow patches queue requests, so the fit sees big batches
mostly when the machine was slow), and at twice the rate the simulation then extrapolates
that cost to bigger batches than it saw; docs/benchmarks.md says how far that goes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from waiting import wait_until

from modkit import Pipeline, loadgen
from modkit.sim import CostModel, Workload, simulate, workload_from_trace
from modkit.trace import Trace

pytestmark = pytest.mark.slow  # launches two pipelines and serves a live run on each, at once

RATE, NUM_REQUESTS, PROMPT_LEN, OUTPUT_LEN, SHARED_PREFIX = 8.0, 80, 64, 32, 32
BUDGET = 16  # max_num_batched_tokens of the run predicted: a prompt's 32 new tokens take two steps or more
THROUGHPUT_TOLERANCE = 0.2  # relative
LATENCY_TOLERANCE = 1.5  # a factor either way
HIT_RATE_TOLERANCE = 0.03  # absolute
SEEDS = range(5)  # simulations of each prediction; the median is compared
# A run whose TTFT p50 is more ITL p50s than this had its requests queue: the machine did not keep
# up with RATE. At moderate load a prompt waits a few steps for its first token (6 to 9 ITLs here).
QUEUED = 20


@dataclasses.dataclass
class Runs:
    fitted_on: Trace  # the run the cost model is fitted on: default settings
    other: Trace  # the run predicted: max_num_batched_tokens=BUDGET


def serve(pipeline: Pipeline, rate: float, seed: int) -> None:
    """Send ``NUM_REQUESTS`` Poisson arrivals at ``rate`` and wait for every reply."""
    workload = Workload.poisson(NUM_REQUESTS, rate, PROMPT_LEN, OUTPUT_LEN, seed=seed, shared_prefix=SHARED_PREFIX)
    loadgen.open_loop(f"{pipeline.url}/v1", pipeline.model_name, workload.prompts, rate, OUTPUT_LEN, seed=seed)


def traced(pipeline: Pipeline) -> Trace:
    """The pipeline's trace, once every request's end and every step's record are in it."""

    def complete() -> bool:
        trace = pipeline.trace(settle_s=0)
        done = trace.requests.dropna(subset=["finish_reason"])
        return len(done) == NUM_REQUESTS and len(trace.forwards) == len(trace.steps)

    assert wait_until(complete, 30), "the trace never held every request's end"
    return pipeline.trace(settle_s=0.2)


@pytest.fixture(scope="module")
def runs() -> Iterator[Runs]:
    """Both runs at once, one on each pipeline, so that both see the same machine: the same other
    processes, and each other. One after the other, a shared box's load changes in between,
    and the cost model is then measured on another machine than the one it predicts.

    The check is for moderate load, as the issue states it. A pair of recordings in which either
    run was not at moderate load is recorded again, twice at most, as notebook 09 does: a run
    whose requests queued (the machine, busy with other work, did not keep up with ``RATE``), or
    one that does not replay itself (its own fit, simulated, misses its own summary as
    ``misses`` counts: a patch of slow steps that no cost model of this machine predicts). If
    none of three pairs was, the machine cannot answer the question and the tests skip, saying
    why; on a box with its cores to itself the first pair is."""
    with (
        Pipeline.launch(ports="auto", seed=0, progress=False) as default,
        Pipeline.launch(ports="auto", seed=0, progress=False, max_num_batched_tokens=BUDGET) as small_budget,
        ThreadPoolExecutor(2) as pool,
    ):
        for attempt in range(3):
            default.clear_trace()
            small_budget.clear_trace()
            seeds = (2 * attempt, 2 * attempt + 1)
            for sent in [pool.submit(serve, default, RATE, seeds[0]), pool.submit(serve, small_budget, RATE, seeds[1])]:
                sent.result()
            recorded = Runs(traced(default), traced(small_budget))
            why = [w for w in map(not_moderate, (recorded.fitted_on, recorded.other)) if w is not None]
            if not why:
                break
            print(f"recording {attempt}: {'; '.join(why)}: recording again")
        else:
            pytest.skip(f"no recording at moderate load in three (load average {os.getloadavg()}): {'; '.join(why)}")
        yield recorded


def not_moderate(trace: Trace) -> str | None:
    """Why ``trace`` was not recorded at moderate load, or None if it was."""
    s = trace.summary()
    if s.ttft_p50_s > QUEUED * s.itl_p50_s:
        ttft, itl = 1e3 * s.ttft_p50_s, 1e3 * s.itl_p50_s
        return f"TTFT p50 {ttft:.0f} ms, over {QUEUED} ITL p50s ({itl:.1f} ms): requests queued"
    if misses(s.to_dict(), predict(trace, CostModel.fit(trace))):
        return "its own fit does not replay it: the machine stalled"
    return None


def predict(trace: Trace, cost: CostModel) -> dict[str, float]:
    """The median over ``SEEDS`` of each summary field, simulating ``trace``'s workload with ``cost``."""
    summaries = [simulate(workload_from_trace(trace), cost, seed=seed).summary().to_dict() for seed in SEEDS]
    return {name: float(np.median([s[name] for s in summaries])) for name in summaries[0]}


def misses(live: dict[str, float], predicted: dict[str, float]) -> list[str]:
    """The checks of the module docstring that ``predicted`` fails, each with its numbers."""
    found = []
    throughput = predicted["output_throughput"] / live["output_throughput"]
    if abs(throughput - 1) > THROUGHPUT_TOLERANCE:
        found.append(f"output throughput: predicted / live {throughput:.2f}")
    for name in ("ttft_p50_s", "itl_p50_s"):
        ratio = predicted[name] / live[name]
        if not 1 / LATENCY_TOLERANCE <= ratio <= LATENCY_TOLERANCE:
            found.append(f"{name}: predicted / live {ratio:.2f}")
    if predicted["num_preemptions"] != live["num_preemptions"]:
        found.append(f"preemptions: predicted {predicted['num_preemptions']}, live {live['num_preemptions']}")
    if abs(predicted["prefix_hit_rate"] - live["prefix_hit_rate"]) > HIT_RATE_TOLERANCE:
        found.append(
            f"prefix-hit rate: predicted {predicted['prefix_hit_rate']:.3f}, live {live['prefix_hit_rate']:.3f}"
        )
    return found


def report(live: dict[str, float], predicted: dict[str, float], cost: CostModel) -> str:
    rows = [
        f"  {name:18s} live {live[name]:10.4f}  predicted {predicted[name]:10.4f}"
        for name in ("output_throughput", "ttft_p50_s", "itl_p50_s", "num_preemptions", "prefix_hit_rate")
    ]
    return "\n".join([str(cost), *rows, f"load average {os.getloadavg()}"])


def test_a_fit_on_one_run_predicts_a_run_with_a_smaller_budget(runs: Runs) -> None:
    cost = CostModel.fit(runs.fitted_on)
    assert workload_from_trace(runs.other).config["max_num_batched_tokens"] == BUDGET  # simulated as it ran
    live, predicted = runs.other.summary().to_dict(), predict(runs.other, cost)
    print("\n" + report(live, predicted, cost))
    assert live["num_requests"] == predicted["num_requests"] == NUM_REQUESTS
    assert live["prefix_hit_rate"] > 0.3  # the shared prefix is found: the hit rate is a real check
    assert not misses(live, predicted), report(live, predicted, cost)


def test_a_cost_model_three_times_too_slow_fails_the_same_check(runs: Runs) -> None:
    cost = CostModel.fit(runs.fitted_on)
    slow = dataclasses.replace(
        cost,
        terms=[{name: 3 * c for name, c in term.items()} for term in cost.terms],
        idle_overhead_s=3 * cost.idle_overhead_s,
        source="three times too slow",
    )
    live, predicted = runs.other.summary().to_dict(), predict(runs.other, slow)
    found = misses(live, predicted)
    assert any(m.startswith("itl_p50_s") for m in found), report(live, predicted, slow)
