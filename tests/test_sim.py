"""``modkit.sim``: the real scheduler objects on a simulated clock, checked against themselves
and against a live pipeline.

The fast tests need no process: a simulation must show what the real ``Scheduler``,
``KVCacheManager`` and ``Router`` do (preemptions in a tiny pool, prefix hits on a shared
prefix, a policy's order), finish every request at its length, and give back the cost model
it ran with when one is fitted on its trace. The slow ones launch the embedded model on the
CPU, serve a Poisson workload live, and compare: ``Trace.summary`` with the numbers rebuilt
from the events, the replayed workload with the one sent, and the simulation of the same
workload and configuration with the live run.
"""

from __future__ import annotations

import bisect
import dataclasses
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from waiting import wait_until

from modkit import Pipeline, loadgen, viz
from modkit.config import ConfigError, cpu_parallel_min_tokens
from modkit.model.config import ModelConfig
from modkit.sampling_params import SamplingParams
from modkit.scheduler.output import NO_FREE_BLOCKS
from modkit.sim import CostModel, Workload, WorkloadRequest, capacity_sweep, knees, simulate, workload_from_trace
from modkit.sim.cost_model import FEATURES, plan_features, step_features
from modkit.sim.regression import nonnegative_least_squares
from modkit.sim.simulate import OUTPUT_RUN
from modkit.sim.worker_loop import WorkerLoop, replay
from modkit.trace import Trace
from modkit.trace.events import ForwardEvent, RequestArrived, StepEvent, TokensOut

# A made-up model of a CPU step: 3 ms a step, 0.2 ms a prompt token, 1 ms a decode.
COST = CostModel(
    [{"step": 3e-3, "num_prompt_tokens": 2e-4, "num_decode_tokens": 1e-3, "decode_context_tokens": 1e-6}],
    step_overhead_s=1e-3,
    idle_overhead_s=2e-3,
    admit_s=2e-3,
    output_s=5e-4,
    source="made up",
)


def poisson(n: int = 40, rate: float = 20.0, shared_prefix: int = 0, seed: int = 0) -> Workload:
    return Workload.poisson(n, rate, prompt_len=64, output_len=16, seed=seed, shared_prefix=shared_prefix)


def test_a_configuration_with_roles_is_refused() -> None:
    """The simulator's workers all do both; it must not predict a disaggregated run as aggregated."""
    with pytest.raises(ConfigError, match="prefill_workers"):
        simulate(poisson(4), COST, prefill_workers=1, decode_workers=1)
    assert len(simulate(poisson(4), COST, num_workers=2).requests) == 4  # the same call without roles runs


# -- workloads -------------------------------------------------------------------------------


def test_poisson_workload_arrives_as_loadgen_sends_and_shares_its_prefix() -> None:
    workload = poisson(50, rate=4.0, shared_prefix=24, seed=3)
    assert [r.arrival_s for r in workload.requests] == loadgen.poisson_send_times(50, 4.0, seed=3)
    prompts = workload.prompts
    assert all(len(p) == 64 and p[:24] == prompts[0][:24] for p in prompts)
    assert len({tuple(p[24:]) for p in prompts}) == 50
    assert all(r.output_len == 16 and r.sampling_params.max_tokens == 16 for r in workload.requests)
    with pytest.raises(ValueError, match="shared_prefix"):
        Workload.poisson(2, 1.0, prompt_len=8, output_len=4, shared_prefix=9)


def test_poisson_prompts_of_lengths_drawn_from_a_range_or_a_list() -> None:
    drawn = Workload.poisson(400, 4.0, prompt_len=range(16, 129), output_len=8, seed=1, shared_prefix=16)
    lengths = [len(p) for p in drawn.prompts]
    assert min(lengths) >= 16 and max(lengths) <= 128 and len(set(lengths)) > 60
    assert 60 < np.mean(lengths) < 84  # uniform over 16..128: mean 72
    assert all(p[:16] == drawn.prompts[0][:16] for p in drawn.prompts)
    listed = Workload.poisson(200, 4.0, prompt_len=[8, 512], output_len=8, seed=1)
    assert {len(p) for p in listed.prompts} == {8, 512}
    assert [r.arrival_s for r in listed.requests] == loadgen.poisson_send_times(200, 4.0, seed=1)
    with pytest.raises(ValueError, match="shortest prompt_len=8"):
        Workload.poisson(2, 1.0, prompt_len=[8, 64], output_len=4, shared_prefix=9)
    with pytest.raises(ValueError, match="prompt_len"):
        Workload.poisson(2, 1.0, prompt_len=[], output_len=4)


# -- the real scheduler objects ------------------------------------------------------------------


def test_every_request_finishes_at_its_length_in_an_ordinary_trace(tmp_path: Path) -> None:
    workload = poisson()
    trace = simulate(workload, COST)
    assert trace.meta["simulated"] is True and trace.meta["cost_model"]["source"] == "made up"
    requests = trace.requests
    assert len(requests) == len(workload)
    assert (requests.num_output_tokens == 16).all() and (requests.finish_reason == "length").all()
    assert (requests.queued - requests.arrival).to_numpy() == pytest.approx(COST.admit_s)  # Queued, admit_s later
    assert (requests.queued <= requests.first_scheduled).all()
    assert (requests.first_scheduled < requests.first_token).all() and (requests.first_token <= requests.finished).all()
    assert len(trace.forwards) == len(trace.steps) > 0
    assert trace.block_state(0).counts()["held"] == 0  # every block given back
    # Saved and loaded as any trace.
    assert Trace.load(trace.save(tmp_path / "sim.json.gz")).summary() == trace.summary()


def test_a_tiny_kv_pool_preempts_and_a_big_one_does_not() -> None:
    workload = poisson(rate=200.0)
    tiny = simulate(workload, COST, num_kv_blocks=14)  # 13 blocks: three prompts of 4, no room to grow
    big = simulate(workload, COST)
    assert tiny.summary().num_preemptions > 0 and big.summary().num_preemptions == 0
    assert tiny.summary().num_preemptions == int(tiny.requests.num_preemptions.sum())
    assert (tiny.requests.num_output_tokens == 16).all()  # preempted requests are recomputed and finish
    assert tiny.summary().ttft_p50_s > big.summary().ttft_p50_s


def test_a_scaled_cost_model_is_a_machine_that_much_slower() -> None:
    """``scaled(2)``: every step twice as long, the hops between processes as they were."""
    drawn = poisson(10, rate=1.0, seed=2)
    # One request at a time, a second apart: the same steps at either speed.
    alone = Workload([dataclasses.replace(r, arrival_s=float(i)) for i, r in enumerate(drawn.requests)])
    base, slower = simulate(alone, COST), simulate(alone, COST.scaled(2.0))
    assert len(slower.steps) == len(base.steps)
    assert slower.steps.forward_s.to_numpy() == pytest.approx(2 * base.steps.forward_s.to_numpy())
    # A request's first token: its admission and the way back, then one step sent to an idle worker.
    first_step = base.requests.ttft.to_numpy() - COST.admit_s - COST.output_s
    assert first_step == pytest.approx(3e-3 + 64 * 2e-4 + COST.overhead(idle=True))  # a 64-token prompt: 18.8 ms
    assert slower.requests.ttft.to_numpy() == pytest.approx(base.requests.ttft.to_numpy() + first_step)
    assert COST.scaled(0.5).plan == COST.plan and COST.scaled(0.5).admit_s == COST.admit_s
    with pytest.raises(ValueError, match="positive"):
        COST.scaled(0.0)


def test_a_shared_prefix_is_hit_unless_prefix_caching_is_off() -> None:
    shared = simulate(poisson(shared_prefix=48), COST)
    # After the first request, each finds its first three blocks (48 of 64 tokens) cached.
    assert shared.summary().prefix_hit_rate == pytest.approx(48 / 64 * (39 / 40), abs=0.01)
    assert simulate(poisson(shared_prefix=0), COST).summary().prefix_hit_rate == 0
    assert simulate(poisson(shared_prefix=48), COST, enable_prefix_caching=False).summary().prefix_hit_rate == 0


def test_sjf_admits_the_shortest_prompt_first_and_fcfs_the_first_arrival() -> None:
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    lengths = [50, 40, 30, 20, 10]
    workload = Workload([WorkloadRequest(0.001 * i, list(range(1, n + 1)), 4, params) for i, n in enumerate(lengths)])

    def order(policy: str) -> list[int]:
        requests = simulate(workload, COST, max_num_seqs=1, scheduling_policy=policy).requests
        return [int(r.removeprefix("sim-")) for r in requests.sort_values("first_scheduled").req_id]

    # The first arrives alone and runs; the rest queue behind it.
    assert order("fcfs") == [0, 1, 2, 3, 4]
    assert order("sjf") == [0, 4, 3, 2, 1]


def test_the_router_spreads_requests_over_workers() -> None:
    trace = simulate(poisson(), COST, num_workers=2, router_policy="round_robin")
    assert trace.routes.worker_id.tolist() == [i % 2 for i in range(40)]
    assert set(trace.steps.worker_id) == {0, 1}
    assert (trace.requests.num_output_tokens == 16).all()


def test_an_unknown_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="num_kv_blocks"):
        simulate(poisson(2), COST, num_kv_block=8)
    with pytest.raises(ConfigError, match="scheduling_policy"):
        simulate(poisson(2), COST, scheduling_policy="lifo")


def test_views_draw_a_simulated_trace() -> None:
    trace = simulate(poisson(rate=200.0), COST, num_kv_blocks=14)
    middle = float(trace.steps.start.median())
    viz.block_grid(trace, at=middle)
    viz.timeline(trace)
    assert len(viz.dashboard(trace).axes) >= len(viz.VIEWS)


# -- cost models ------------------------------------------------------------------------------


def varied_workload() -> Workload:
    """Prompts of many lengths, some longer than the budget below (chunked), so that no feature follows another."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    rng = np.random.default_rng(0)
    return Workload(
        [
            WorkloadRequest(0.02 * i, [int(t) for t in rng.integers(1, 999, size=n)], int(rng.integers(2, 30)), params)
            for i, n in enumerate(rng.integers(5, 200, size=60))
        ]
    )


def test_a_fit_on_a_simulated_trace_gives_back_its_cost_model() -> None:
    trace = simulate(varied_workload(), COST, max_num_batched_tokens=128)
    fitted = CostModel.fit(trace)
    steps = [e for e in trace.events if isinstance(e, StepEvent)]
    for step in steps:  # a fit folds the per-step overhead into its forward
        features = step_features(step.scheduled)
        for idle in (False, True):
            expected = COST.forward_time(features) + COST.overhead(idle)
            assert fitted.forward_time(features) + fitted.overhead(idle) == pytest.approx(expected, rel=1e-6)
    assert fitted.fit_error is not None and fitted.fit_error.p90 < 1e-6 and fitted.fit_error.outliers == 0
    for name in ("idle_overhead_s", "admit_s", "output_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(COST, name), rel=1e-6), name
    assert fitted.spread == pytest.approx([1.0] * len(fitted.spread))


def test_tokens_reach_the_frontend_after_the_fits_output_delays_taken_in_runs() -> None:
    """``output_delays``: a fit keeps each step's (its result at the scheduler to its tokens at
    the frontend), in order; a simulation takes them in runs of consecutive ones (a jump one step
    in ``OUTPUT_RUN``), and a fit on what it recorded gives back the delays it took."""
    delays = [1e-4 + 1e-6 * i for i in range(200)]  # 0.1 to 0.3 ms, each its own
    jittery = dataclasses.replace(COST, output_delays=delays, output_s=float(np.median(delays)))
    trace = simulate(poisson(seed=3), jittery)
    ends = sorted(e.started + e.step_s for e in trace.events if isinstance(e, StepEvent))
    taken = [e.ts - ends[bisect.bisect_right(ends, e.ts) - 1] for e in trace.events if isinstance(e, TokensOut)]
    which = [round((d - 1e-4) / 1e-6) for d in taken]
    assert len(taken) >= 100 and taken == pytest.approx([delays[i] for i in which], abs=1e-9)
    in_a_run = np.mean([b == (a + 1) % len(delays) for a, b in itertools.pairwise(which)])
    assert 1 - 2 / OUTPUT_RUN < in_a_run < 1 - 0.5 / OUTPUT_RUN
    fitted = CostModel.fit(trace)
    assert fitted.output_delays == pytest.approx(taken, abs=1e-9)
    assert fitted.output_s == pytest.approx(float(np.median(taken)))


def test_a_fit_says_how_far_the_machines_speed_moved_within_the_run() -> None:
    """A run whose second half ran on a machine 1.5 times as slow: ``price_range`` spans 1.5."""
    steady = simulate(varied_workload(), COST, max_num_batched_tokens=128)
    slower = simulate(varied_workload(), COST.scaled(1.5), max_num_batched_tokens=128)

    def steps(trace: Trace, first_step: int, offset_s: float) -> list[StepEvent]:
        return [
            msgspec.structs.replace(e, step=e.step + first_step, started=e.started + offset_s)
            for e in trace.events
            if isinstance(e, StepEvent)
        ]

    first = steps(steady, 0, 0.0)
    end = max(e.started + e.step_s for e in first)
    both = Trace([*first, *steps(slower, len(first), end + 1.0)], steady.meta)
    assert CostModel.fit(steady).fit_error.price_range == pytest.approx((1.0, 1.0))
    low, high = CostModel.fit(both).fit_error.price_range
    assert low < 1 < high and high / low == pytest.approx(1.5, rel=0.1)


def test_a_runs_pace_is_how_much_longer_its_steps_took_than_the_fit_prices_them() -> None:
    """``pace``: a run on a machine 1.3 times as slow as the fit's took 1.3 times its prices, on
    the recording's traffic or other traffic; the recording itself 1. A trace without steps has
    no pace."""
    recording = simulate(varied_workload(), COST, max_num_batched_tokens=128)
    fitted = CostModel.fit(recording)
    assert fitted.pace(recording) == pytest.approx(1.0)
    slower = simulate(varied_workload(), COST.scaled(1.3), max_num_batched_tokens=128)
    assert fitted.pace(slower) == pytest.approx(1.3)
    other = simulate(poisson(60, rate=40.0, seed=3), COST.scaled(0.8), max_num_batched_tokens=128)
    assert fitted.pace(other) == pytest.approx(0.8)
    # At its pace, the fit gives the other run back: its TTFTs as they were (the hops kept their times).
    again = simulate(workload_from_trace(other), fitted.scaled(fitted.pace(other)), max_num_batched_tokens=128)
    assert again.requests.ttft.to_numpy() == pytest.approx(other.requests.ttft.to_numpy(), rel=1e-6)
    # A light load: one token a request, a second apart, every step sent to an idle worker; its
    # price has the idle overhead in it.
    drawn = poisson(12, rate=1.0, seed=4)
    alone = Workload([dataclasses.replace(r, arrival_s=float(i), output_len=1) for i, r in enumerate(drawn.requests)])
    assert COST.pace(simulate(alone, COST)) == pytest.approx(1.0)
    no_steps = Trace([e for e in recording.events if not isinstance(e, StepEvent)], recording.meta)
    with pytest.raises(ValueError, match="no steps"):
        fitted.pace(no_steps)


def test_a_fit_says_which_steps_of_a_what_if_lie_beyond_its_recording() -> None:
    """``CostModel.extrapolation``: a step is unlike the recording's when its leverage over the
    recorded steps (the hat value, ``x^T (X^T X)^+ x``) is above that of 99 in 100 of them, or it
    moves in a direction they never moved in (``modkit.sim.coverage``)."""
    recorded = simulate(poisson(120, rate=10.0), COST)
    cost = CostModel.fit(recorded)
    coverage = cost.coverage
    assert coverage is not None and coverage.num_steps == len(recorded.steps)
    # The leverage is the textbook hat value, for the recorded steps themselves.
    steps = [e for e in recorded.events if isinstance(e, StepEvent)]
    x = np.asarray([[step_features(e.scheduled)[n] for n in FEATURES] for e in steps])
    hat = np.einsum("ij,jk,ik->i", x, np.linalg.pinv(x.T @ x), x)
    assert coverage.leverage(x) == pytest.approx(hat, rel=1e-6, abs=1e-12)
    assert 0 < cost.extrapolation(recorded).outside <= 0.01 + 1 / coverage.num_steps  # by the edge's definition

    same = simulate(poisson(120, rate=10.0, seed=1), cost)  # other arrivals, the same rate
    assert same.meta["extrapolation"]["outside"] == cost.extrapolation(same).outside < 0.1
    busier = cost.extrapolation(simulate(poisson(120, rate=100.0, seed=1), cost))
    assert busier.outside > 0.5
    most, recorded_most = busier.beyond["num_decode_tokens"]
    assert most > 5 * recorded_most and "decodes a step" in str(busier)

    # The recording's prompts all came whole, 64 tokens a prompt step: a step with a smaller chunk
    # mixes prompt tokens and prompt steps as no recorded step did, whatever its size.
    chunked = simulate(poisson(120, rate=10.0, seed=1), cost, max_num_batched_tokens=32)
    steps = [e for e in chunked.events if isinstance(e, StepEvent)]
    x = np.asarray([[step_features(e.scheduled)[n] for n in FEATURES] for e in steps])
    part = np.asarray([any(s.kind != "decode" and s.num_tokens < 64 for s in e.scheduled) for e in steps])
    h = coverage.leverage(x)
    assert part.any() and np.isinf(h[part]).all() and np.isfinite(h[~part]).all()

    # A cost model fitted on no recording has nothing to compare with.
    assert COST.extrapolation(recorded) is None and simulate(poisson(8), COST).meta["extrapolation"] is None


def test_a_fit_finds_a_step_cost_that_shows_in_the_next_steps_gap() -> None:
    """As on a GPU, where a worker launches a step's kernels and goes on: each prompt step's
    result comes back early, and the step after it late by as much. Fitted two by two, the
    prompt steps' cost is found all the same (one by one, a fit prices them at nothing)."""
    prompt_steps = dataclasses.replace(COST, terms=[{**COST.terms[0], "prompt_step": 4e-3}])
    trace = simulate(varied_workload(), prompt_steps, max_num_batched_tokens=128)
    moved = 3e-3  # of each prompt step's time, seen in the gap before the next result instead
    shifted = [
        msgspec.structs.replace(e, step_s=e.step_s - moved)
        if isinstance(e, StepEvent) and step_features(e.scheduled)["prompt_step"]
        else e
        for e in trace.events
    ]
    steps = [e for e in shifted if isinstance(e, StepEvent)]
    assert all(a.started + a.step_s < b.started + b.step_s for a, b in itertools.pairwise(steps))  # still in order
    fitted = CostModel.fit(Trace(shifted, trace.meta))
    assert fitted.terms[0]["prompt_step"] == pytest.approx(4e-3, rel=0.05)
    assert fitted.terms[0]["step"] == pytest.approx(COST.terms[0]["step"] + COST.step_overhead_s, rel=0.05)


def test_on_a_gpu_a_prompt_steps_cost_is_found_wherever_its_host_work_lands() -> None:
    """As on an H100: a prompt step's host work shows, in streaks, either in the gap of the step
    before it (the worker launched it before returning that step's result) or in its own, and a
    little in the step after's either way. A fit of a GPU trace keeps each prompt step with both
    neighbours and gives its cost back; pairs of steps, which hold it only one way round, miss it."""
    prompt_steps = dataclasses.replace(COST, terms=[{**COST.terms[0], "prompt_step": 4e-3}])
    # Prompts of many lengths, one every 70 ms or so: most prompt steps come between two decode steps.
    trace = simulate(Workload.poisson(80, 15.0, prompt_len=range(8, 97), output_len=24, seed=1), prompt_steps)
    events = list(trace.events)
    at = [i for i, e in enumerate(events) if isinstance(e, StepEvent)]
    steps = [events[i] for i in at]
    shifted = 0
    for k in range(1, len(steps) - 1):
        before, step, after = steps[k - 1], steps[k], steps[k + 1]
        if not step_features(step.scheduled)["prompt_step"] or step_features(before.scheduled)["prompt_step"]:
            continue
        if step_features(after.scheduled)["prompt_step"] or before.started + before.step_s <= step.started:
            continue  # only prompt steps between two decode steps, planned while the one before ran
        end = step.started + step.step_s
        if shifted // 4 % 2 == 0:  # in streaks of four: the step before's result comes back 3 ms late
            late = min(3e-3, end - (before.started + before.step_s) - 0.2e-3)
            steps[k - 1] = msgspec.structs.replace(before, step_s=before.step_s + late)
        steps[k] = msgspec.structs.replace(step, step_s=step.step_s - 0.5e-3)  # and 0.5 ms of it in the step after's
        shifted += 1
    assert shifted >= 20
    for i, e in zip(at, steps, strict=True):
        events[i] = e
    assert all(a.started + a.step_s < b.started + b.step_s for a, b in itertools.pairwise(steps))  # still in order
    gpu = CostModel.fit(Trace(events, {**trace.meta, "device": "cuda"}))
    assert gpu.terms[0]["prompt_step"] == pytest.approx(4e-3, rel=0.05)
    assert gpu.terms[0]["step"] == pytest.approx(COST.terms[0]["step"] + COST.step_overhead_s, rel=0.05)
    in_pairs = CostModel.fit(Trace(events, {**trace.meta, "device": "cpu"}))
    prompts = [step_features(e.scheduled) for e in steps if step_features(e.scheduled)["prompt_step"]]
    cost = np.asarray([prompt_steps.forward_time(f) + COST.step_overhead_s for f in prompts])
    for fitted, miss in ((gpu, lambda m: m < 0.02), (in_pairs, lambda m: m > 0.1)):
        priced = np.asarray([fitted.forward_time(f) for f in prompts])
        assert miss(float(np.median(np.abs(priced - cost) / cost)))
    no_steps = [e for e in events if not isinstance(e, StepEvent)]
    for device in ("cpu", "cuda"):  # a trace of too few steps says so
        with pytest.raises(ValueError, match="too few"):
            CostModel.fit(Trace(no_steps, {**trace.meta, "device": device}))


def test_the_scheduler_plans_one_step_after_another_and_admissions_cost_a_round_trip() -> None:
    """``plan``: the scheduler's work on a step before it leaves, a KV round trip when it admits
    a request or gives one new blocks; a fit gives it back from the steps' ``schedule_s``."""
    planned = dataclasses.replace(COST, plan={"kv_round_trip": 1.5e-3, "admits": 0.5e-3, "step": 0.1e-3})
    workload = poisson(seed=2)
    trace = simulate(workload, planned)
    steps = [e for e in trace.events if isinstance(e, StepEvent)]
    for step in steps:
        features = plan_features(step, block_size=16)
        expected = 0.1e-3 + 1.5e-3 * features["kv_round_trip"] + 0.5e-3 * features["admits"]
        assert step.schedule_s == pytest.approx(expected)
    admitting = [s for s in steps if any(r.kind == "prompt" and r.num_computed_tokens == 0 for r in s.scheduled)]
    assert admitting and all(s.schedule_s == pytest.approx(2.1e-3) for s in admitting)
    # One at a time (1 request/s), a request's first step leaves once planned: each TTFT is 2.1 ms longer.
    alone = poisson(10, rate=1.0, seed=2)
    slower = simulate(alone, planned).requests.ttft.to_numpy() - simulate(alone, COST).requests.ttft.to_numpy()
    assert slower == pytest.approx(2.1e-3)
    fitted = CostModel.fit(trace)
    assert fitted.plan == pytest.approx({"kv_round_trip": 1.5e-3, "admits": 0.5e-3, "step": 0.1e-3}, rel=1e-6)
    nothing = msgspec.structs.replace(steps[0], scheduled=[], waiting={}, preempted={})
    assert plan_features(nothing, block_size=16) == {"kv_round_trip": 0.0, "admits": 0.0, "step": 1.0}


@pytest.mark.slow
def test_a_live_step_waits_for_the_kv_cache_manager_when_its_plan_features_say_so() -> None:
    """``plan_features``' round trip against the live KV client's: a step waits for the KV cache
    manager's reply (``kv_s`` > 0) exactly when it admits a request, gives one new blocks,
    preempts one, or found the first in line too big for the free blocks. On a pool too small
    for the traffic, requests wait for blocks while others decode: steps of decodes ask too."""
    workload = Workload.poisson(12, 50.0, 40, 24, seed=3)
    with Pipeline.launch(ports="auto", seed=0, progress=False, num_kv_blocks=12) as pipeline:
        loadgen.open_loop(f"{pipeline.url}/v1", pipeline.model_name, workload.prompts, 50.0, 24, seed=0)

        def traced() -> bool:  # every request's end and every step's record are in
            trace = pipeline.trace(settle_s=0)
            return len(trace.requests.dropna(subset=["finish_reason"])) == 12 and len(trace.forwards) == len(
                trace.steps
            )

        assert wait_until(traced, 30), "the trace never held every request's end"
        trace = pipeline.trace()
    block_size = int(trace.meta["block_size"])
    steps = [e for e in trace.events if isinstance(e, StepEvent)]
    decoding_while_one_waits = [
        e
        for e in steps
        if any(why.startswith(NO_FREE_BLOCKS) for why in e.waiting.values())
        and all(r.kind == "decode" for r in e.scheduled)
    ]
    assert len(decoding_while_one_waits) >= 5, "the pool never made a request wait for blocks while others decoded"
    for e in steps:
        assert plan_features(e, block_size)["kv_round_trip"] == float(e.kv_s > 0), (e.step, e.waiting, e.preempted)


def test_a_fit_on_a_trace_with_stalls_gives_back_the_ordinary_steps_cost() -> None:
    """One step in ten is a stall, four or six times as long as the model says (as a shared machine
    makes them); the fit must give back the model of the other nine, and keep the stalls in its spread."""
    stalls = dataclasses.replace(COST, spread=[1.0] * 90 + [4.0] * 5 + [6.0] * 5)
    trace = simulate(varied_workload(), stalls, max_num_batched_tokens=128, seed=1)
    fitted = CostModel.fit(trace)
    steps = [e for e in trace.events if isinstance(e, StepEvent)]
    for step in steps:
        features = step_features(step.scheduled)
        expected = COST.forward_time(features) + COST.overhead(False)
        assert fitted.forward_time(features) + fitted.overhead(False) == pytest.approx(expected, rel=1e-3)
    assert fitted.idle_overhead_s == pytest.approx(COST.idle_overhead_s, rel=1e-2)
    error = fitted.fit_error
    assert error is not None and error.median < 1e-3 and 0 < error.outliers < 0.3
    assert sorted(fitted.spread)[len(fitted.spread) // 2] == pytest.approx(1.0, rel=1e-3)
    assert max(fitted.spread) > 3  # the stalls, for the simulator to draw
    # Least squares, unweighted, is pulled by them: its step costs miss the ordinary ones.
    x = np.asarray([[step_features(e.scheduled)[n] for n in FEATURES] for e in steps[1:]])
    gaps = np.asarray(
        [b.started + b.step_s - max(b.started, a.started + a.step_s) for a, b in itertools.pairwise(steps)]
    )
    plain = x @ nonnegative_least_squares(x, gaps)
    ordinary = x @ np.asarray([fitted.terms[0][n] for n in FEATURES])
    assert np.median(np.abs(plain - ordinary) / ordinary) > 0.05


# A made-up GPU worker: a decode step launches in 0.5 ms of host time and runs 1 ms on the
# device after that; a prompt step's launch takes 4 ms more (its eager attention layers).
LOOP = WorkerLoop(
    launch={"step": 0.5e-3, "prompt_step": 4e-3},
    device={"step": 1e-3},
    sample_launch_s=0.1e-3,
    finish_s=0.2e-3,
    hop_in_s=0.1e-3,
    hop_out_s=0.05e-3,
    replan_s=0.05e-3,
)


def test_a_gpu_worker_overlaps_a_plan_that_comes_in_time_and_not_a_late_one() -> None:
    """``LoopWorker`` does what the worker's loop does (``modkit.worker.service``): a plan that
    arrives while the step before is on the device is launched before that step is finished; one
    that arrives after the device is done overlaps nothing."""
    launch, device = [0.5e-3, 0.5e-3], [1e-3, 1e-3]
    starts, sent = replay([0.0, 0.3e-3], launch, device, 0.1e-3, 0.2e-3)
    # Step 0 is launched from 0 to 0.6 ms and on the device until 1.6. Step 1 arrived at 0.3, when
    # the host was busy: launched from 0.6 to 1.2; then step 0 is finished (1.6 + 0.2), and step
    # 1, on the device from 1.6 to 2.6, at 2.8.
    assert starts == pytest.approx([0.0, 0.6e-3]) and sent == pytest.approx([1.8e-3, 2.8e-3])
    starts, sent = replay([0.0, 2.0e-3], launch, device, 0.1e-3, 0.2e-3)
    # Step 1 arrives after step 0 was finished: launched from 2.0 to 2.6, on the device to 3.6.
    assert starts == pytest.approx([0.0, 2.0e-3]) and sent == pytest.approx([1.8e-3, 3.8e-3])
    # With every plan ahead, the results come at the pace of the slower of the host (launch,
    # sample launch and finish) and the device (1 ms).
    for host, pace in ((0.5e-3, 1e-3), (1.5e-3, 1.8e-3)):
        _, sent = replay([0.0] * 20, [host] * 20, [1e-3] * 20, 0.1e-3, 0.2e-3)
        assert np.diff(sent)[5:-1] == pytest.approx(pace)  # the last, with nothing launched behind it, sooner


def test_a_fit_on_a_gpu_trace_gives_back_the_worker_loop_it_ran() -> None:
    """On a GPU a fit also times the worker's loop (``CostModel.loop``): the launches and hops
    measured, the rest found by replaying the trace's own plans. Fitted on a trace simulated
    with a loop, it replays that trace's launches and results as they came, and its simulation
    of the same workload gives the same latencies; a CPU trace gets none."""
    planned = {"kv_round_trip": 1e-3, "step": 0.05e-3}  # a plan with a round trip comes late
    on_gpu = dataclasses.replace(COST, fitted_on={"device": "cuda"}, loop=LOOP, plan=planned)
    workload = varied_workload()
    trace = simulate(workload, on_gpu, max_num_batched_tokens=128)
    fitted = CostModel.fit(trace)
    loop = fitted.loop
    assert loop is not None
    for name in FEATURES:
        assert loop.launch[name] == pytest.approx(LOOP.launch.get(name, 0.0), abs=1e-7), name
    for name in ("hop_in_s", "replan_s"):
        assert getattr(loop, name) == pytest.approx(getattr(LOOP, name), abs=1e-6), name
    # What a trace tells apart: the host's time from a launch's end to the result at the
    # scheduler (how it splits between the sampling's launch, the finish and the hop is not).
    around = loop.sample_launch_s + loop.finish_s + loop.hop_out_s
    assert around == pytest.approx(LOOP.sample_launch_s + LOOP.finish_s + LOOP.hop_out_s, abs=0.02e-3)
    assert loop.result_miss_s < 0.01e-3 and loop.launch_miss_s < 0.01e-3
    again = simulate(workload, fitted, max_num_batched_tokens=128).summary()
    for name in ("ttft_p50_s", "itl_p50_s", "output_throughput"):
        assert getattr(again, name) == pytest.approx(getattr(trace.summary(), name), rel=0.03), name
    assert CostModel.fit(simulate(workload, COST, max_num_batched_tokens=128)).loop is None


def test_roofline_of_qwen_on_an_h100() -> None:
    qwen = ModelConfig.from_hf_dict(
        {
            "architectures": ["Qwen2ForCausalLM"],
            "vocab_size": 151936,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
        }
    )
    h100, h200 = CostModel.roofline(qwen, "H100"), CostModel.roofline(qwen, "H200")
    num_params = h100.info["num_params"]
    assert num_params == pytest.approx(494e6, rel=0.01)  # Qwen2.5-0.5B: 0.49 B parameters
    one_decode = step_features([_Scheduled(1, "decode", 256)])
    # One decode reads every weight (bf16) once: memory-bound, 2 bytes a parameter over 3.35 TB/s.
    assert h100.forward_time(one_decode) == pytest.approx(2 * num_params / 3.35e12, rel=0.05)
    assert h200.forward_time(one_decode) < h100.forward_time(one_decode)
    # A 2,048-token prompt chunk does 2 FLOPs a parameter a token: compute-bound at 989 TFLOP/s.
    prefill = step_features([_Scheduled(2048, "prompt", 0)])
    assert h100.forward_time(prefill) == pytest.approx(2 * num_params * 2048 / 989e12, rel=0.15)
    assert h200.forward_time(prefill) == pytest.approx(h100.forward_time(prefill), rel=0.05)
    with pytest.raises(ValueError, match="unknown gpu"):
        CostModel.roofline(qwen, "TPU")
    assert set(FEATURES) >= {k for term in h100.terms for k in term}


@dataclasses.dataclass
class _Scheduled:
    num_tokens: int
    kind: str
    num_computed_tokens: int


# -- against a live pipeline ----------------------------------------------------------------------

RATE, NUM_REQUESTS, PROMPT_LEN, OUTPUT_LEN, SHARED_PREFIX = 5.0, 60, 64, 32, 32


@dataclasses.dataclass
class LiveRun:
    workload: Workload  # what was sent
    trace: Trace
    results: list[loadgen.RequestResult]


@pytest.fixture(scope="module")
def live() -> Iterator[LiveRun]:
    """The embedded model on the CPU, default settings, serving a Poisson workload with a shared prefix."""
    workload = Workload.poisson(NUM_REQUESTS, RATE, PROMPT_LEN, OUTPUT_LEN, seed=0, shared_prefix=SHARED_PREFIX)
    with Pipeline.launch(ports="auto", seed=0, progress=False) as pipeline:
        results, _ = loadgen.open_loop(
            f"{pipeline.url}/v1", pipeline.model_name, workload.prompts, RATE, OUTPUT_LEN, seed=0
        )

        def traced() -> bool:  # every request's last tokens and every step's record are in
            trace = pipeline.trace(settle_s=0)
            return len(trace.requests.dropna(subset=["finish_reason"])) == NUM_REQUESTS and len(trace.forwards) == len(
                trace.steps
            )

        assert wait_until(traced, 30), "the trace never held every request's end"
        yield LiveRun(workload, pipeline.trace(), results)


@pytest.mark.slow
def test_summary_of_a_live_trace_is_what_its_events_say(live: LiveRun) -> None:
    events = live.trace.events
    arrived = {e.req_id: e.ts for e in events if isinstance(e, RequestArrived)}
    token_times: dict[str, list[float]] = {}
    for e in events:
        if isinstance(e, TokensOut):
            for req_id, n in e.counts.items():
                if n > 0:
                    token_times.setdefault(req_id, []).append(e.ts)
    ttft = [times[0] - arrived[r] for r, times in token_times.items()]
    itl = [b - a for times in token_times.values() for a, b in itertools.pairwise(times)]
    steps = [e for e in events if isinstance(e, StepEvent)]
    num_tokens = sum(n for e in events if isinstance(e, TokensOut) for n in e.counts.values())
    duration = max(t for times in token_times.values() for t in times) - min(arrived.values())

    summary = live.trace.summary()
    assert summary.num_requests == NUM_REQUESTS
    assert summary.num_output_tokens == num_tokens == sum(r.output_tokens for r in live.results)
    assert summary.duration_s == pytest.approx(duration)
    assert summary.output_throughput == pytest.approx(num_tokens / duration)
    assert summary.ttft_p50_s == pytest.approx(np.percentile(ttft, 50))
    assert summary.ttft_p99_s == pytest.approx(np.percentile(ttft, 99))
    assert summary.itl_p50_s == pytest.approx(np.percentile(itl, 50))
    assert summary.itl_p99_s == pytest.approx(np.percentile(itl, 99))
    assert summary.num_preemptions == sum(len(e.preempted) for e in steps)
    hits, queries = sum(e.prefix_cache_hits for e in steps), sum(e.prefix_cache_queries for e in steps)
    assert summary.prefix_hit_rate == pytest.approx(hits / queries) and summary.prefix_hit_rate > 0.3
    assert "TTFT" in repr(summary) and "tok/s" in repr(summary)


@pytest.mark.slow
def test_the_workload_of_a_live_trace_is_the_one_sent(live: LiveRun) -> None:
    replayed = workload_from_trace(live.trace)
    assert len(replayed) == NUM_REQUESTS
    assert sorted(replayed.prompts) == sorted(live.workload.prompts)
    assert all(r.output_len == OUTPUT_LEN for r in replayed.requests)
    assert all(r.sampling_params.temperature == 0 and r.sampling_params.ignore_eos for r in replayed.requests)
    assert replayed.config["num_kv_blocks"] == live.trace.meta["num_blocks"][0]
    # The frontend saw them arrive about when loadgen sent them (a loaded box delays a few).
    sent = [r.arrival_s for r in live.workload.requests]
    offsets = np.abs(np.subtract([r.arrival_s for r in replayed.requests], sent))
    assert np.median(offsets) < 0.05 and offsets.max() < 1.0, offsets


@pytest.mark.slow
def test_made_up_traffic_is_simulated_on_the_pool_a_launch_gets(live: LiveRun) -> None:
    """Without num_kv_blocks, each simulated worker gets the blocks the live launch's worker got."""
    made_up = simulate(poisson(4), COST)
    assert made_up.meta["num_blocks"] == live.trace.meta["num_blocks"]
    assert made_up.meta["max_model_len"] == live.trace.meta["max_model_len"]
    with pytest.raises(ConfigError, match="num_kv_blocks"):
        simulate(poisson(4), COST, device="cuda")  # a GPU's pool depends on its free memory
    assert simulate(poisson(4), COST, device="cuda", num_kv_blocks=64).meta["num_blocks"] == [64]


@pytest.mark.slow
def test_a_simulation_of_the_live_run_predicts_its_throughput_and_ttft(live: LiveRun) -> None:
    cost = CostModel.fit(live.trace)
    replayed = workload_from_trace(live.trace)
    measured = live.trace.summary()
    predicted = [simulate(replayed, cost, seed=seed).summary() for seed in range(5)]
    report = f"\nlive: {measured}\nsimulated (seed 0): {predicted[0]}\n{cost}\nload: {os.getloadavg()}"
    print(report)
    for name in ("output_throughput", "ttft_p50_s"):
        prediction = float(np.median([getattr(p, name) for p in predicted]))
        assert prediction == pytest.approx(getattr(measured, name), rel=0.25), f"{name}{report}"
    assert all(p.num_preemptions == measured.num_preemptions == 0 for p in predicted)
    assert all(p.prefix_hit_rate == pytest.approx(measured.prefix_hit_rate, abs=0.02) for p in predicted)


@pytest.mark.slow
def test_a_fit_keeps_the_machine_and_the_cpu_the_run_used(live: LiveRun) -> None:
    """A launch on the CPU records what a fit needs to price another share of the cores
    (modkit.sim.cpu_share): the device, each worker's threads, the cores, each process's CPU time."""
    meta, cores = live.trace.meta, len(os.sched_getaffinity(0))
    assert (meta["device"], meta["worker_threads"], meta["usable_cores"]) == ("cpu", cores, cores)
    cpu = meta["cpu_s"]
    assert set(cpu) == {"frontend", "scheduler", "worker-0", "router", "kv_cache_manager", "sampler", "launcher"}
    assert all(seconds >= 0 for seconds in cpu.values())
    forwards = float(live.trace.forwards.forward_s.sum())
    assert cpu["worker-0"] >= 0.3 * forwards  # its forwards ran on it (most of the time, on a busy box)
    cost = CostModel.fit(live.trace)
    split_from = cpu_parallel_min_tokens(None, cores)  # a step of fewer tokens ran on one thread
    assert cost.fitted_on == {
        "device": "cpu",
        "worker_threads": cores,
        "cpu_parallel_min_tokens": split_from,
        "usable_cores": cores,
        "num_workers": 1,
    }
    assert cost.cpu_demand is not None and cost.cpu_demand == pytest.approx(
        sum(cpu.values()) / sum(w for w in _busy_seconds(live.trace))
    )
    assert cost.worker_threads(2) == max(1, cores // 2)
    # The threads torch ran each forward on, as the worker read them back: one under split_from
    # tokens (64-token prompts whose first 32 are cached, and decodes), all of them from there on.
    forwards = [e for e in live.trace.events if isinstance(e, ForwardEvent)]
    ran_on = {(e.num_tokens >= split_from, e.num_threads) for e in forwards}
    assert ran_on == ({(False, 1), (True, cores)} if split_from > 1 else {(True, cores)}), ran_on


def _busy_seconds(trace: Trace) -> list[float]:
    """Each step's time on the worker, as the fit counts it: its end minus when the worker could start it."""
    steps = sorted((e for e in trace.events if isinstance(e, StepEvent) and e.failed is None), key=lambda e: e.step)
    ends = [e.started + e.step_s for e in steps]
    return [end - max(e.started, before) for e, end, before in zip(steps, ends, [-np.inf, *ends], strict=False)]


@pytest.mark.slow
def test_a_thousand_requests_simulate_a_hundred_times_faster_than_they_would_run(live: LiveRun) -> None:
    """Timed in this process's CPU seconds: on a shared box the wall clock also counts the time
    other processes held the cores (a busy CI box made the same simulation 4x slower by the wall
    clock); the CPU time is what the simulation itself costs, and on an idle machine the two agree."""
    cost = CostModel.fit(live.trace)
    workload = Workload.poisson(1000, RATE, PROMPT_LEN, OUTPUT_LEN, seed=1, shared_prefix=SHARED_PREFIX)
    started, started_cpu = time.perf_counter(), time.process_time()
    trace = simulate(workload, cost)
    wall, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    simulated = trace.summary().duration_s
    print(f"\n1,000 requests: {simulated:.1f} simulated seconds in {cpu:.2f} CPU seconds ({wall:.2f} wall)")
    assert trace.summary().num_requests == 1000
    assert simulated / cpu >= 100, f"{simulated / cpu:.0f}x"


@pytest.mark.slow  # starts a script
def test_the_script_replays_a_saved_trace_with_other_settings(tmp_path: Path) -> None:
    recorded = simulate(varied_workload(), COST, max_num_batched_tokens=128).save(tmp_path / "run.json.gz")
    out = tmp_path / "what_if.json.gz"
    command = [sys.executable, "scripts/simulate.py", str(recorded), "--set", "num_kv_blocks=14", "--out", str(out)]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "recorded:" in done.stdout and "simulated:" in done.stdout
    what_if = Trace.load(out)
    assert what_if.meta["simulated"] and what_if.meta["num_blocks"] == [14]
    assert what_if.meta["max_num_batched_tokens"] == 128  # the recorded settings, but for the one changed
    assert f"preemptions        {what_if.summary().num_preemptions}" in done.stdout
    beyond = CostModel.fit(Trace.load(recorded)).extrapolation(what_if)
    assert f"beyond the fit's recording: {beyond}" in done.stdout
    assert what_if.meta["extrapolation"]["outside"] == beyond.outside
    bad = subprocess.run([*command[:3], "--set", "num_kv_block=14"], cwd=repo, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean 'num_kv_blocks'" in bad.stderr
    # --price: the same run on a machine twice as slow, as CostModel.scaled simulates it.
    slower = tmp_path / "slower.json.gz"
    done = subprocess.run([*command[:3], "--price", "2", "--out", str(slower)], cwd=repo, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr
    run = Trace.load(recorded)
    expected = simulate(workload_from_trace(run), CostModel.fit(run).scaled(2)).summary()
    assert Trace.load(slower).summary() == expected
    assert expected.ttft_p50_s > 1.5 * simulate(workload_from_trace(run), CostModel.fit(run)).summary().ttft_p50_s
    bad = subprocess.run([*command[:3], "--price", "0"], cwd=repo, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--price" in bad.stderr


def test_a_pool_too_small_for_the_model_length_lowers_it_as_a_launch_does() -> None:
    workload = poisson(4)  # 64 + 16 tokens a request
    just_enough = simulate(workload, COST, num_kv_blocks=6)  # 5 blocks: 80 tokens
    assert just_enough.meta["max_model_len"] == 80 and (just_enough.requests.num_output_tokens == 16).all()
    too_small = simulate(workload, COST, num_kv_blocks=5)  # 64 tokens: no room for one output token
    assert too_small.meta["max_model_len"] == 64 and (too_small.requests.finish_reason == "rejected").all()
    with pytest.raises(ConfigError, match="max_model_len"):
        simulate(workload, COST, num_kv_blocks=5, max_model_len=128)


def test_a_capacity_sweep_finds_where_each_configuration_stops_keeping_up() -> None:
    def workload_at(rate: float) -> Workload:
        return Workload.poisson(150, rate, prompt_len=64, output_len=16, seed=0)

    rates = [5.0, 20.0, 80.0, 320.0]
    configs = {"one worker": {}, "two workers": {"num_workers": 2}}
    frame = capacity_sweep(workload_at, COST, rates, configs)
    assert len(frame) == len(rates) * len(configs) and (frame.num_requests == 150).all()
    found = knees(frame)
    one, two = found["one worker"], found["two workers"]
    assert one is not None and two is not None and two > 1.5 * one  # two workers sustain nearly twice as much
    for name, rate in found.items():
        rows = frame[frame.config == name].set_index("request_rate")
        assert rate == rows.request_throughput.max()  # loadgen.knee: the most it completed
        assert rows.ttft_p99_s.is_monotonic_increasing  # past the knee the queue, and TTFT, grow
    figure = viz.capacity(frame)
    ax = figure.axes[0]
    knee_lines = {a.get_gid(): a for a in ax.get_lines() if str(a.get_gid()).startswith("knee-")}
    assert set(knee_lines) == {"knee-one worker", "knee-two workers"}
    assert np.asarray(knee_lines["knee-two workers"].get_xdata())[0] == pytest.approx(two)


@pytest.mark.slow  # starts a script
def test_the_script_sweeps_rates_and_finds_each_configurations_knee(tmp_path: Path) -> None:
    """A second worker roughly doubles what the made-up model keeps up with: its knee lies further
    out, and its TTFT p99 is lower at every rate."""
    recorded = simulate(varied_workload(), COST, max_num_batched_tokens=128).save(tmp_path / "run.json.gz")
    out, figure = tmp_path / "sweep.json", tmp_path / "capacity.png"
    command = [
        *(sys.executable, "scripts/simulate.py", "--cost-from", str(recorded), "--poisson", "200"),
        *("--output-len", "16", "--sweep", "10", "20", "40", "80", "160", "--compare", "2 workers: num_workers=2"),
        *("--out", str(out), "--figure", str(figure)),
    ]
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        command, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    one, two = report["knees"]["default"], report["knees"]["2 workers"]
    assert one is not None and two is not None and two > 1.5 * one, report["knees"]
    rows = report["rows"]
    for rate in report["rates"]:
        p99 = {r["config"]: r["ttft_p99_s"] for r in rows if r["request_rate"] == rate}
        assert p99["2 workers"] < p99["default"], rate
    assert figure.read_bytes().startswith(b"\x89PNG")
    assert f"knee of default: {one:.1f} requests/s" in done.stdout
    # Past its knee a configuration's steps grow beyond any the cost model was fitted on.
    for name in report["knees"]:
        outside = {r["request_rate"]: r["outside_fit"] for r in rows if r["config"] == name}
        assert outside[max(outside)] > 0.5 > outside[min(outside)], (name, outside)
    assert "unlike fit" in done.stdout


def load_sim_fidelity() -> Any:
    """``scripts/sim_fidelity.py`` as a module."""
    spec = importlib.util.spec_from_file_location("sim_fidelity", Path(__file__).parents[1] / "scripts/sim_fidelity.py")
    assert spec is not None and spec.loader is not None
    sim_fidelity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim_fidelity)
    return sim_fidelity


def test_sim_fidelity_settles_the_machine_before_the_fit_run() -> None:
    """``sim_fidelity.settle``: warm-up runs until one's pace against a fit on the run before is
    within the bound; a run whose trace lost events counts for nothing; at most ``most`` runs."""
    sim_fidelity = load_sim_fidelity()
    served: list[int] = []

    def machine(speeds: dict[int, float]) -> Callable[[int], Trace]:
        def run(seed: int) -> Trace:
            served.append(seed)
            if speeds[seed] == 0:
                raise sim_fidelity.IncompleteTrace("lost on the way")
            return simulate(poisson(seed=seed), COST.scaled(speeds[seed]))

        return run

    first = sim_fidelity.WARM_UP_SEED
    speeding_up = {first + k: f for k, f in enumerate([1.4, 1.2, 1.05, 1.04, 1.0, 1.0, 1.0, 1.0])}
    paces = sim_fidelity.settle(machine(speeding_up), 0.03, 8)
    assert paces == pytest.approx([1.2 / 1.4, 1.05 / 1.2, 1.04 / 1.05], rel=0.01)
    assert served == [first, first + 1, first + 2, first + 3]
    served.clear()  # a lost run in between: the next one has no run before it to be measured against
    paces = sim_fidelity.settle(machine({**speeding_up, first + 2: 0}), 0.03, 8)
    assert paces == pytest.approx([1.2 / 1.4, 1.0 / 1.04, 1.0], rel=0.01) and len(served) == 6
    served.clear()  # never settles: stops after ``most`` runs
    swinging = {first + k: 1.0 + 0.2 * (k % 2) for k in range(8)}
    assert len(sim_fidelity.settle(machine(swinging), 0.03, 4)) == 3 and len(served) == 4


@pytest.mark.slow
def test_sim_fidelity_settles_a_live_pipeline() -> None:
    """``settle`` on a live pipeline, as ``sim_fidelity.py --settle`` runs it: each warm-up is a
    traced run of the real pipeline, the paces are of real fits on them, and it stops at the
    first pace within the bound or after ``most`` runs."""
    sim_fidelity = load_sim_fidelity()
    served: list[int] = []
    with Pipeline.launch(ports="auto", seed=0, progress=False) as pipeline:

        def run(seed: int) -> Trace:
            served.append(seed)
            warm_up = poisson(n=20, seed=seed)
            return sim_fidelity.live_run(pipeline, warm_up, 20.0, 16, seed)

        paces = sim_fidelity.settle(run, 0.10, 3)
    first = sim_fidelity.WARM_UP_SEED
    assert served == list(range(first, first + len(paces) + 1)) and 1 <= len(paces) <= 2, (served, paces)
    assert all(0.5 < pace < 2.0 for pace in paces), paces  # one machine, a few seconds apart
    settled = [abs(pace - 1) <= 0.10 for pace in paces]
    assert not any(settled[:-1]) and (settled[-1] or len(served) == 3), paces


def test_sim_fidelity_replays_saved_traces_under_their_configurations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``scripts/sim_fidelity.py --replay``: the fit on ``base-seed0`` and each saved run simulated
    again under the configuration its name says (the small pool's blocks from the trace), with that
    fit, with a fit on the run itself and, for CPU runs (which go round the pipelines), with a fit
    on the base run of its round (of the round before, for a base run), and with the first fit at
    the run's pace, exactly as fitting and simulating them by hand does."""
    sim_fidelity = load_sim_fidelity()
    runs = {
        "base-seed0": simulate(poisson(seed=0), COST),
        "base-seed1": simulate(poisson(seed=1), COST.scaled(1.25)),  # on a machine a quarter slower
        "another_launch-seed1": simulate(poisson(seed=1), COST.scaled(0.9)),  # the base settings, launched again
        "budget_64-seed1": simulate(poisson(seed=1), COST, max_num_batched_tokens=64),
        "small_KV_pool-seed1": simulate(poisson(rate=200.0, seed=1), COST, num_kv_blocks=14),
        "sjf_small_KV_pool-seed1": simulate(
            poisson(rate=200.0, seed=1), COST, num_kv_blocks=14, scheduling_policy="sjf"
        ),
    }
    for name, trace in runs.items():
        trace.meta["device"] = "cpu"  # served round the pipelines, as on a CPU
        trace.save(tmp_path / f"{name}.json.gz")
    rows = sim_fidelity.replay(tmp_path, ["base", "another launch", "budget 64", "small KV pool", "sjf, small KV pool"])
    cost = CostModel.fit(Trace.load(tmp_path / "base-seed0.json.gz"))
    round_one = CostModel.fit(Trace.load(tmp_path / "base-seed1.json.gz"))
    overrides = {
        "base": {},
        "another launch": {},
        "budget 64": {"max_num_batched_tokens": 64},
        "small KV pool": {"num_kv_blocks": 14},
        "sjf, small KV pool": {"scheduling_policy": "sjf", "num_kv_blocks": 14},
    }
    for name, config in overrides.items():
        recorded = Trace.load(tmp_path / f"{sim_fidelity.file_stem(name)}-seed1.json.gz")
        expected = simulate(workload_from_trace(recorded), cost, **config).summary()
        own = simulate(workload_from_trace(recorded), CostModel.fit(recorded), **config).summary()
        nearby = simulate(workload_from_trace(recorded), cost if name == "base" else round_one, **config).summary()
        unlike = cost.extrapolation(recorded).outside
        pace = cost.pace(recorded)
        at_pace = simulate(workload_from_trace(recorded), cost.scaled(pace), **config).summary()
        assert rows[name] == {
            "live": [recorded.summary()],
            "simulated": [expected],
            "own fit": [own],
            "round's fit": [nearby],
            "at its pace": [at_pace],
            "unlike fit": [unlike],
            "pace": [pace],
        }, name
    assert rows["small KV pool"]["simulated"][0].num_preemptions > 0  # the small pool's, not the default one
    # The policy's: sjf admits new requests before preempted ones, fcfs the other way round.
    sjf, fcfs = rows["sjf, small KV pool"]["simulated"][0], rows["small KV pool"]["simulated"][0]
    assert sjf.ttft_p50_s < 0.8 * fcfs.ttft_p50_s and sjf.itl_p99_s > 5 * fcfs.itl_p99_s, (sjf, fcfs)
    assert any(r["own fit"] != r["simulated"] for r in rows.values())  # two fits, told apart
    assert rows["budget 64"]["round's fit"] != rows["budget 64"]["simulated"]  # and the round's, too
    assert rows["base"]["pace"][0] == pytest.approx(1.25) and rows["budget 64"]["pace"][0] == pytest.approx(1.0)
    assert rows["another launch"]["pace"][0] == pytest.approx(0.9)
    slower = rows["base"]  # the run on a slower machine: missed at the fit's pace, found at its own
    miss = {c: slower[c][0].itl_p50_s / slower["live"][0].itl_p50_s - 1 for c in ("simulated", "at its pace")}
    assert miss["simulated"] < -0.15 and abs(miss["at its pace"]) < 0.02, miss
    # The table ends with how many latency medians each fit predicted within 10% of the live ones.
    capsys.readouterr()
    medians = sim_fidelity.print_table(rows)
    printed = capsys.readouterr().out
    for column, label in (
        ("simulated", "the fit run's fit"),
        ("own fit", "each run's own fit"),
        ("round's fit", "the round's fit"),
        ("at its pace", "the fit run's fit at each run's pace"),
    ):
        errors = [abs(m[column][k] / m["live"][k] - 1) for m in medians.values() for k in ("ttft_p50_s", "itl_p50_s")]
        within = sum(e <= 0.10 for e in errors)
        assert f"with {label}: {within} of 10 latency medians within 10% of the live ones" in printed, printed
