"""How a step on the CPU changes with its share of the cores: threads (measured) and sharing.

A launch on the CPU splits the usable cores between the workers: each gets
``usable_cores // num_workers`` OpenMP threads (``modkit.pipeline.processes.worker_threads_env``),
on which it runs its steps of ``cpu_parallel_min_tokens`` tokens or more (a smaller one on one
thread: ``modkit.config.cpu_step_threads``), and the workers run at the same time on the same
cores, beside the scheduler, sampler,
frontend, router and KV cache manager. A cost model fitted on a run of one worker prices each
step as that worker ran it: on every core, with the cores it did not use free for the other
processes. Another number of workers changes two things, each modelled from a measurement:

**Threads: Amdahl's law, one parallel fraction per kind of work** (``CpuShare``, measured by
running the model's steps as a worker runs them). Of a step's time on one thread, a fraction
``p`` runs split over the threads and the rest on one::

    time(n threads) = time(1 thread) x ((1 - p) + p / n)

so a step fitted at ``n_fit`` threads takes ``((1 - p) + p / n) / ((1 - p) + p / n_fit)`` times
as long at ``n``. ``p`` differs with the work: the matrix products of a prompt's tokens split
well, a decode's small ones less, and a step's fixed cost (Python, the hops between
processes) not at all. So it is measured per group of the cost model's features::

    group    features                                            measured as
    step     step, prompt_step                                   a step's intercept
    prompt   num_prompt_tokens, prompt_attention_tokens          the time per prompt token
    decode   num_decode_tokens, decode_context_tokens, num_seqs  the time per decode in a batch

each on one thread and on every usable core: ``p = (1 - r) / (1 - 1 / cores)``, where ``r`` is
the cost on every core over the cost on one, at most 1 (nothing runs faster than split
evenly). It may be below 0: work that takes longer on more threads.

NOTE: why below 0. The embedded model's decode steps are too small to gain from threads:
on two threads that sleep while they wait (``OMP_WAIT_POLICY=PASSIVE``, as a launch runs
them), a step's fixed cost measured 1.16 to 1.41 times its cost on one thread (three 2-core
machines), the second thread woken and waited for at every parallel region. Live it shows
the same way: in two-worker runs, a decode step while the other worker was idle (one thread,
a core free for the other processes) took 0.84 to 0.87, 0.82 to 0.95 and 0.73 to 0.94 of its
price in the one-worker fit on both threads. Kept at ``p = 0`` (priced as fitted), the
simulator put it at 0.98 to 1.04; with the measured ``p``, at 0.92, 0.76 to 0.77 and 0.78
to 0.81 (docs/benchmarks.md, "Two workers on two cores, step by step"). Since then a worker
runs such small steps on one thread (``PipelineConfig.cpu_parallel_min_tokens``), and a fit on
its trace prices them there: only the bigger steps change threads between launches.

**Sharing: the cores, in proportion to what wants them** (processor sharing, from the fit's
trace). A launch records each process's CPU seconds over a trace (``meta["cpu_s"]``); their
sum over the time the worker was busy (``CostModel.cpu_demand``) is how many cores a busy
worker keeps busy, its own threads and the work of the other processes for its steps
together (1.3: a core and a third). While ``k`` workers are busy at once, they want
``k x cpu_demand`` cores of the ``cores`` there are, and each step takes longer by::

    max(1, k x cpu_demand / cores) / max(1, cpu_demand / cores)

(over the fit's own, which had one worker). On two cores with a demand of 1.3, two busy
workers take 1.3 times as long a step each; on sixteen, nothing changes. Measured live on the
three 2-core machines above (demands 1.28, 1.37 and 1.28), a decode step while the other
worker was busy took 1.35, 1.31 and 1.17 times one while it was idle (medians over three runs).

Who counts as busy (``modkit.sim.simulate``): another worker with requests to serve, for the
whole step, since it keeps stepping until they are done; an idle one for the part of the step
before its last step in flight ends.

On a GPU neither applies (a worker's host threads prepare small tensors, and the workers
compute on their devices): a cost model fitted there, or a roofline, is used as it is.

``CpuShare.measure`` runs ``python -c ...cpu_share.main()`` in a fresh process for each thread
count, with a worker's thread settings (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY=PASSIVE``), the
model loaded in each. It takes seconds; on a busy machine it is as noisy as the machine
(medians of repeated steps).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from modkit.transport.process import usable_cores  # the cores a launch counts

# The cost model's features in each group (see the module docstring).
GROUPS = {
    "step": ("step", "prompt_step"),
    "prompt": ("num_prompt_tokens", "prompt_attention_tokens"),
    "decode": ("num_decode_tokens", "decode_context_tokens", "num_seqs"),
}
PROMPT_LEN = 64  # tokens of each measured prompt
PROMPT_BATCHES = (1, 4)  # prompts in a prefill step the fractions are measured on: 64 and 256 tokens
DECODE_BATCHES = (1, 8)  # requests in a decode step the fractions are measured on
HELD_OUT = ("prefill_2",)  # timed too, not used: to check a prediction on (tests/test_sim_cpu.py)
DECODE_STEPS = 16  # decode steps timed per batch and round
ROUNDS = 5  # each measurement is the median over this many rounds


@dataclass(frozen=True, slots=True)
class CpuShare:
    """How a step on ``cores`` CPU cores changes with its threads: Amdahl's p for each group of features."""

    cores: int  # the usable cores it was measured on
    parallel_fraction: dict[str, float]  # group ("step", "prompt", "decode") -> Amdahl's p
    measured: dict[str, Any] = field(default_factory=dict)  # threads -> median seconds of each kind of step

    def thread_scale(self, threads: int, fitted_threads: int) -> dict[str, float]:
        """Feature -> how much longer its share of a step takes on ``threads`` than on ``fitted_threads``."""

        def amdahl(p: float, n: int) -> float:
            return (1.0 - p) + p / n

        scale = {}
        for group, features in GROUPS.items():
            p = self.parallel_fraction.get(group, 0.0)
            for name in features:
                scale[name] = amdahl(p, threads) / amdahl(p, fitted_threads)
        return scale

    def describe(self) -> dict[str, Any]:
        return {"cores": self.cores, "parallel_fraction": self.parallel_fraction, "measured": self.measured}

    @classmethod
    def measure(cls, model: str | None = None, dtype: str | None = None, cores: int | None = None) -> CpuShare:
        """Time ``model``'s steps (the embedded model by default) as a launch's worker runs them, on
        1 thread and on ``cores`` (default: the usable cores), each in a fresh process."""
        cores = cores or usable_cores()
        return cls.from_timings(
            cores, {"1": _time_in_process(1, model, dtype), str(cores): _time_in_process(cores, model, dtype)}
        )

    @classmethod
    def from_timings(cls, cores: int, measured: dict[str, dict[str, float]]) -> CpuShare:
        """Amdahl's p of each group from the median steps on 1 thread and on ``cores`` (``measured``,
        keyed by the thread count as text, as ``measure`` keeps them)."""
        cost_one, cost_every = group_costs(measured["1"]), group_costs(measured[str(cores)])
        fractions = {}
        for group in GROUPS:  # p from r = every / one = (1 - p) + p / cores
            r = cost_every[group] / cost_one[group] if cost_one[group] > 0 else 1.0
            fractions[group] = min((1.0 - r) / (1.0 - 1.0 / cores), 1.0) if cores > 1 else 0.0
        return cls(cores, fractions, measured)


def _time_in_process(threads: int, model: str | None, dtype: str | None) -> dict[str, float]:
    """``_time_steps`` in a fresh process with a worker's thread settings for ``threads`` threads."""
    args = repr([*(["--model", model] if model else []), *(["--dtype", dtype] if dtype else [])])
    code = f"import sys; sys.argv[1:] = {args}; from modkit.sim.cpu_share import main; main()"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"measuring on {threads} threads failed:\n{done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


# -- the measuring process -----------------------------------------------------------------------


def _time_steps(model: str | None, dtype: str | None) -> dict[str, float]:
    """Median seconds of each kind of step: ``prefill_B`` (B prompts at once), ``decode_B`` (B decodes)."""
    import torch

    from modkit.engine.config import EngineConfig
    from modkit.engine.core import EngineCore
    from modkit.request import Request
    from modkit.sampling_params import SamplingParams

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    core = EngineCore(EngineConfig(model=model, dtype=dtype, device="cpu", async_scheduling=False))
    rng, ids = random.Random(0), iter(range(10**9))

    def steps(num_requests: int, max_tokens: int) -> list[float]:
        """Add ``num_requests`` prompts at once, run them to the end; each step's seconds."""
        for _ in range(num_requests):
            prompt = [rng.randrange(100, 1000) for _ in range(PROMPT_LEN)]  # no two share a prefix
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
            core.add_request(Request(f"m{next(ids)}", prompt, params))
        times = []
        while core.has_unfinished_requests():
            start = time.perf_counter()
            core.step()
            times.append(time.perf_counter() - start)
        return times

    def one_round() -> dict[str, list[float]]:
        times = {f"prefill_{b}": [steps(b, 1)[0]] for b in sorted({*PROMPT_BATCHES, 2})}
        for b in DECODE_BATCHES:
            times[f"decode_{b}"] = steps(b, DECODE_STEPS + 1)[1:]  # the first step is the prompts'
        return times

    one_round()  # warm-up: the first steps of each shape allocate
    rounds = [one_round() for _ in range(ROUNDS)]
    return {kind: statistics.median(t for r in rounds for t in r[kind]) for kind in rounds[0]}


def group_costs(medians: dict[str, float]) -> dict[str, float]:
    """Seconds per unit of each group (see GROUPS), from the median steps of one process."""
    (b0, b1), (d0, d1) = PROMPT_BATCHES, DECODE_BATCHES
    per_prompt_token = (medians[f"prefill_{b1}"] - medians[f"prefill_{b0}"]) / ((b1 - b0) * PROMPT_LEN)
    per_decode = (medians[f"decode_{d1}"] - medians[f"decode_{d0}"]) / (d1 - d0)
    intercept = medians[f"decode_{d0}"] - d0 * per_decode
    return {"step": max(intercept, 0.0), "prompt": max(per_prompt_token, 0.0), "decode": max(per_decode, 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description="One measuring process of CpuShare.measure: prints _time_steps' JSON.")
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()
    print(json.dumps(_time_steps(args.model, args.dtype)), flush=True)
