"""``CostModel``: how long one step takes, as a function of what the step computes.

The simulator replaces the model's forward by this, and nothing else. A step's forward time
is the longest of a few *terms*, each a linear function of the step's features::

    features  num_prompt_tokens       prompt tokens computed (chunks, recomputes after a preemption)
              prompt_attention_tokens sum over prompt chunks of chunk * (num_computed_tokens + chunk / 2):
                                      the query-key pairs of their attention
              num_decode_tokens       requests that compute one new token
              decode_context_tokens   sum over decodes of num_computed_tokens: the KV each one reads
              num_seqs                requests in the batch
              batched                 1 if there is more than one: a cost that comes once a step has
                                      two or more requests, not again with each one (see below)
              prompt_step             1 if it computes prompt tokens: a cost that comes once a step has
                                      a prompt chunk (see below)
              step                    1: a constant per step

and the step as the scheduler sees it (plan sent to result back) takes ``step_overhead_s``
more (the hops between the scheduler, worker and sampler), and ``idle_overhead_s`` more
again when the worker had nothing in flight (no other step hid the plan's trip); before the
plan leaves, the scheduler works on it for ``plan_time`` (``plan_features``).

NOTE: why ``batched``. A step's cost is not linear in its requests. The embedded model's
decode steps, timed on the CPU (one thread), take 3.4 ms for one request, 4.5 ms for two and
still 4.5 to 5 ms for eight: past the second, a request adds little. A fit on a run whose
steps hold mostly one to three requests, with ``num_seqs`` alone, charges every request the
jump from the first to the second, and at twice the traffic (up to eight requests a step)
predicted inter-token latencies 35 to 67% longer than live on the 2-core box. ``batched``
takes the jump once.

NOTE: why ``prompt_step``. On a GPU a decode-only step replays one CUDA graph, and a step with
a prompt chunk runs the piecewise graphs with each layer's attention launched eagerly between
them (``modkit.worker.cuda_graphs``): a cost per step, whatever the chunk's size. A fit on a
run whose prompts come whole (256 tokens a step) charges it to each prompt token, and then
prices a step of a 64-token chunk (``max_num_batched_tokens=64``) far below what it costs.

Two ways to get one:

- ``CostModel.fit(trace)``: one term, fitted over the steps of a live run, each timed as the
  scheduler saw it: when its result came back minus when the worker could start it (the plan
  was sent, or the step before came back, whichever is later; with async scheduling steps
  overlap, and this is the gap between them). The hops between processes are in that time,
  so they are in the fitted ``step`` coefficient; a step sent to an idle worker takes
  ``idle_overhead_s`` more. The fit is robust (``modkit.sim.regression``: Huber's weights,
  coefficients >= 0): the ordinary steps decide it, not the stalls of a busy machine.
  ``fit_error`` reports how far it is from the steps it was fitted on.
- ``CostModel.roofline(model_config, gpu="H100")``: two terms, compute (FLOPs over peak
  FLOP/s) and memory (bytes over HBM bandwidth): the weights are read once a step, and each
  decode reads its KV. For hardware the learner does not have; it knows no overheads.

A fitted model also keeps its steps' spread (``spread``: each of the fit's rows' measured time
over its prediction, as fitted; a row is a pair of steps in a row, or on a GPU a step or a
prompt step with its neighbours (``CostModel.fit``): about 1 for an ordinary pair, 2.5 for a
pair holding a stall four times as long as its step).
The simulator multiplies each forward by one drawn at random (a residual bootstrap), so that
its steps vary as the live run's did, stalls included: the medians and tails of latencies
depend on that, not only their means.

How fast another run's steps went against a fitted model's prices is its ``pace``
(``CostModel.pace``): 1.25 where they took a quarter longer, as on a slower machine.

Two latencies around the steps, fitted too: ``admit_s`` (a request's arrival at the frontend
to its scheduler, ``Queued``: the hops through the router) and ``output_s`` (a step's result
at the scheduler to its tokens at the frontend), with each step's output delay as measured,
in order (``output_delays``).

NOTE: why each output delay, and not their median. A step's tokens leave the scheduler after
it has planned the next step, and reach the frontend's event loop when it gets to them: on an
H100 (2026-12-07) the delay was 0.24 ms at p10 and 0.9 to 1.5 ms at p90, against a step of 1.45 ms.
A request's inter-token latency is its step's gap plus the difference of two such delays. With
a constant delay, the simulated inter-token latencies were those of the steps alone, and with
a budget of 64 tokens (steps of decodes at 1.4 to 1.9 ms between prompt chunks at 4 to 5 ms,
where the median falls on the slope between them) the ITL p50 was 7 to 14% short even with
each run's own fit. The simulator draws the delays as they came, in runs of consecutive ones
(``simulate``): they are correlated from step to step (lag-1 autocorrelation 0.3 to 0.4).

What a fit was measured under is kept in ``fitted_on``, from the trace's meta: the device,
each worker's threads, the usable cores, the number of workers. On the CPU the workers
share the cores (``modkit.sim.cpu_share``), so a configuration with more workers runs each
step on fewer threads, and slower while other workers compute: ``thread_scale`` rescales each
feature's share of a step to the threads a step of its size runs on in a launch of that many
workers (a step under ``cpu_parallel_min_tokens`` tokens on one; ``step_threads``) (with a
``CpuShare`` measured on the same machine: ``CostModel.fit(trace, cpu_share=CpuShare.measure())``),
and ``sharing`` stretches a step while other workers are busy, from ``cpu_demand``: the cores
a busy worker kept busy in the fit, its own and the other processes' work together (the
trace's ``meta["cpu_s"]`` over the time the worker was busy). A run of several workers on the
CPU cannot split its CPU seconds between them; there the steps say it instead: each step is
priced alone, stretched by ``sharing`` for the other workers computing during it, and the
demand that makes the pairs' times fit best is kept (``_fit_sharing``; on the three 2-core
machines of docs/benchmarks.md it found 1.1 to 1.5, where their one-worker runs' CPU seconds
said 1.28 to 1.37). On a GPU neither applies.
"""

from __future__ import annotations

import bisect
import dataclasses
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from modkit.config import cpu_parallel_min_tokens, cpu_step_threads, cpu_worker_threads
from modkit.scheduler.output import NO_FREE_BLOCKS
from modkit.sim.coverage import Coverage, Extrapolation
from modkit.sim.cpu_share import CpuShare
from modkit.sim.regression import robust_nonnegative_fit
from modkit.sim.worker_loop import WorkerLoop, fit_loop
from modkit.trace.events import Queued, RequestArrived, StepEvent, TokensOut

if TYPE_CHECKING:
    from modkit.model.config import ModelConfig
    from modkit.trace.trace import Trace

FEATURES = (
    "num_prompt_tokens",
    "prompt_attention_tokens",
    "num_decode_tokens",
    "decode_context_tokens",
    "num_seqs",
    "batched",
    "prompt_step",
    "step",
)

SHARING_STEPS = 10  # candidate demands between the cores each worker could have and all of them (_fit_sharing)
PRICE_WINDOW = 25  # fit rows in a row whose median is the steps' price at a moment (FitError.price_range)

# What the scheduler's work on a step depends on (plan_features).
PLAN_FEATURES = ("kv_round_trip", "admits", "step")

# Trace meta keys that say what a fit was measured under (a launch records them).
FITTED_ON = ("device", "worker_threads", "cpu_parallel_min_tokens", "usable_cores", "num_workers")


class ScheduledLike(Protocol):
    """One request's share of a step: a live ``ScheduledReq`` or a scheduler's ``ScheduledEntry``."""

    @property
    def num_tokens(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def num_computed_tokens(self) -> int: ...
    @property
    def num_cached_tokens(self) -> int: ...


def step_features(scheduled: Iterable[ScheduledLike]) -> dict[str, float]:
    """The features of a step that computes ``scheduled`` (see the module docstring)."""
    f = dict.fromkeys(FEATURES, 0.0)
    for s in scheduled:
        f["num_seqs"] += 1
        if s.kind == "decode":
            f["num_decode_tokens"] += s.num_tokens
            f["decode_context_tokens"] += s.num_computed_tokens
        else:
            f["num_prompt_tokens"] += s.num_tokens
            f["prompt_attention_tokens"] += s.num_tokens * (s.num_computed_tokens + s.num_tokens / 2)
    f["batched"] = 1.0 if f["num_seqs"] > 1 else 0.0
    f["prompt_step"] = 1.0 if f["num_prompt_tokens"] else 0.0
    f["step"] = 1.0
    return f


class PlannedLike(Protocol):
    """What a step's plan did: a live ``StepEvent`` or a scheduler's ``StepRecord``."""

    @property
    def scheduled(self) -> Sequence[ScheduledLike]: ...
    @property
    def waiting(self) -> Mapping[str, str]: ...  # req_id -> why it was not scheduled
    @property
    def preempted(self) -> Mapping[str, str]: ...  # req_id -> why it lost its blocks


def plan_features(step: PlannedLike, block_size: int) -> dict[str, float]:
    """What ``step`` cost the scheduler to plan (``PLAN_FEATURES``): a round trip to the KV cache
    manager if it asked it for blocks (the client sends a step's calls together, once a step:
    ``modkit.kvcache.client``), the admissions' own work, and a constant. It asked if it
    admitted a request, gave one new blocks, preempted one (its blocks ran out), or found the
    first in line too big for the free blocks (``NO_FREE_BLOCKS``).

    NOTE: the asking that gets nothing. With a small KV pool and requests waiting for blocks,
    most steps admit nothing and allocate nothing, yet each asks the KV cache manager whether the
    first in line fits. On an H100 (2026-12-07) such steps took 0.44 to 0.50 ms to plan, where a
    step without a round trip took 0.04 ms."""
    admits = allocates = False
    for s in step.scheduled:
        if s.kind == "prompt" and s.num_computed_tokens == s.num_cached_tokens:
            admits = True  # admitted this step: it starts where its prefix-cache hit ends
        elif -(-(s.num_computed_tokens + s.num_tokens) // block_size) > -(-s.num_computed_tokens // block_size):
            allocates = True  # its new tokens reach past the blocks it holds
    refused = bool(step.preempted) or any(why.startswith(NO_FREE_BLOCKS) for why in step.waiting.values())
    return {"kv_round_trip": float(admits or allocates or refused), "admits": float(admits), "step": 1.0}


@dataclass(frozen=True, slots=True)
class FitError:
    """How far a fitted model is from the steps it was fitted on.

    ``median`` and ``p90`` are of ``|predicted - measured| / max(measured, floor_s)``, where
    ``floor_s`` is the median step: a miss relative to the step, except that a step shorter
    than the median one (a result that came back just after the one before) counts against
    the median step, so a miss of 0.1 ms on a 0.05 ms step is not an error of 200%.
    ``median_s`` and ``p90_s`` are the same misses in seconds. ``price_range`` is how far the
    steps' price moved within the run, against the fit: the p10 and p90, over the run, of the
    steps' measured over fitted time, each a median of ``PRICE_WINDOW`` of the fit's rows (pairs
    of steps) in a row (1, 1: it held still). The machine's speed moves it, and so does whatever
    the fit's features miss that comes in stretches. Where it is wide, answers that multiply a
    step's price (a TTFT of requests queued behind others) are off by more than the fit error
    says (notebook 09)."""

    median: float
    p90: float
    num_steps: int
    floor_s: float = 0.0
    median_s: float = 0.0
    p90_s: float = 0.0
    outliers: float = 0.0  # share of the steps the robust fit weighed less than half (stalls)
    price_range: tuple[float, float] = (1.0, 1.0)

    @classmethod
    def of(
        cls,
        predicted: np.ndarray,
        measured: np.ndarray,
        weights: np.ndarray,
        price_range: tuple[float, float] = (1.0, 1.0),
    ) -> FitError:
        floor = float(np.median(measured))
        miss = np.abs(predicted - measured)
        relative = miss / np.maximum(measured, max(floor, 1e-12))
        return cls(
            median=float(np.median(relative)),
            p90=float(np.percentile(relative, 90)),
            num_steps=len(measured),
            floor_s=floor,
            median_s=float(np.median(miss)),
            p90_s=float(np.percentile(miss, 90)),
            outliers=float(np.mean(weights < 0.5)),
            price_range=price_range,
        )


@dataclass(frozen=True, slots=True)
class CostModel:
    terms: list[dict[str, float]]  # each: feature -> seconds per unit; a forward takes its longest term
    step_overhead_s: float = 0.0  # every step, beyond its forward
    idle_overhead_s: float = 0.0  # more, for a step sent to a worker with nothing in flight
    plan: dict[str, float] = field(default_factory=dict)  # PLAN_FEATURES -> seconds: the scheduler's work on a step
    admit_s: float = 0.0
    output_s: float = 0.0
    output_delays: list[float] = field(default_factory=list)  # seconds, each step's, in order (empty: output_s)
    source: str = ""  # how it was made, for a simulated trace's meta
    fit_error: FitError | None = None
    spread: list[float] = field(default_factory=list)  # measured / predicted step times (empty: none)
    info: dict[str, Any] = field(default_factory=dict)
    # What the fit was measured under (FITTED_ON keys of the trace's meta); empty if not known.
    fitted_on: dict[str, Any] = field(default_factory=dict)
    cpu_share: CpuShare | None = None  # measured on the fit's CPU: how a step changes with its threads
    cpu_demand: float | None = None  # cores a busy worker kept busy in the fit, the other processes' work included
    coverage: Coverage | None = None  # which steps the fit's recording held (None: no recording)
    # On a GPU: the worker's loop, timed (modkit.sim.worker_loop); the simulator then times steps by it.
    loop: WorkerLoop | None = None

    def forward_time(
        self, features: dict[str, float], rng: random.Random | None = None, scale: dict[str, float] | None = None
    ) -> float:
        """Seconds the worker spends on a step with these features; with ``rng``, times one of
        ``spread``; with ``scale`` (feature -> factor, ``thread_scale``), each feature's share rescaled."""
        scale = scale or {}
        predicted = max(
            sum(c * features.get(name, 0.0) * scale.get(name, 1.0) for name, c in term.items()) for term in self.terms
        )
        return predicted * rng.choice(self.spread) if rng is not None and self.spread else predicted

    def worker_threads(self, num_workers: int) -> int | None:
        """Each worker's threads in a launch of ``num_workers`` on the fit's CPU (as
        ``worker_threads_env`` gives them); None unless the fit was on the CPU and says its cores."""
        cores = self.fitted_on.get("usable_cores")
        return cpu_worker_threads(cores, num_workers) if self.fitted_on.get("device") == "cpu" and cores else None

    def step_threads(self, num_tokens: int, num_workers: int, setting: int | None = None) -> tuple[int, int] | None:
        """The threads a step of ``num_tokens`` tokens runs on in a launch of ``num_workers`` (with
        ``cpu_parallel_min_tokens=setting``), and the threads it ran on in the fit: a CPU worker
        runs a step under its ``cpu_parallel_min_tokens`` on one thread (a fit on a trace that
        does not say ran every step on every thread). None unless the fit was on the CPU and says
        its cores and threads."""
        threads, fitted = self.worker_threads(num_workers), self.fitted_on.get("worker_threads")
        if threads is None or not fitted:
            return None
        now = cpu_step_threads(num_tokens, threads, cpu_parallel_min_tokens(setting, threads))
        return now, cpu_step_threads(num_tokens, fitted, self.fitted_on.get("cpu_parallel_min_tokens") or 1)

    def thread_scale(self, num_workers: int, num_tokens: int, setting: int | None = None) -> dict[str, float]:
        """Feature -> how much longer its share of a step of ``num_tokens`` tokens takes in a launch
        of ``num_workers`` than in the fit (``step_threads``, ``CpuShare.thread_scale``); empty (no
        change) where the threads are the same, or without a ``cpu_share`` measured on the fit's CPU."""
        threads = self.step_threads(num_tokens, num_workers, setting)
        if self.cpu_share is None or threads is None or threads[0] == threads[1]:
            return {}
        return self.cpu_share.thread_scale(*threads)

    def sharing(self, busy_workers: float) -> float:
        """How much longer a step takes while ``busy_workers`` (itself included; a fraction for a
        worker busy part of the step) compute on the fit's CPU than in the fit, where it ran alone
        (see ``modkit.sim.cpu_share``); 1 on a GPU, or where the fit's trace did not say."""
        cores, demand = self.fitted_on.get("usable_cores"), self.cpu_demand
        if self.fitted_on.get("device") != "cpu" or not cores or not demand:
            return 1.0
        return float(processor_sharing(busy_workers, demand, cores))

    def plan_time(self, step: PlannedLike, block_size: int, rng: random.Random | None = None) -> float:
        """Seconds the scheduler takes to plan ``step`` (``plan_features``); with ``rng`` and a
        ``loop``, times one of the loop's spread for such a plan (``WorkerLoop.plan_spread``)."""
        if not self.plan:
            return 0.0
        features = plan_features(step, block_size)
        fitted = sum(c * features[name] for name, c in self.plan.items())
        if rng is not None and self.loop is not None:
            spread = self.loop.plan_spread.get("kv_round_trip" if features["kv_round_trip"] else "local")
            if spread:
                return fitted * rng.choice(spread)
        return fitted

    def overhead(self, idle: bool) -> float:
        """Seconds a step takes beyond its forward, as the scheduler sees it."""
        return self.step_overhead_s + (self.idle_overhead_s if idle else 0.0)

    def scaled(self, factor: float) -> CostModel:
        """This model with each step ``factor`` times as long (its forward and its overheads): a
        machine that much slower (``factor`` > 1) or faster. The scheduler's planning and the
        hops between processes keep their times. How much an answer moves when the step's price
        does is how far a change of the machine's speed carries it (notebook 09)."""
        if not factor > 0:
            raise ValueError(f"factor must be a positive number, got {factor!r}")
        return dataclasses.replace(
            self,
            terms=[{name: c * factor for name, c in term.items()} for term in self.terms],
            step_overhead_s=self.step_overhead_s * factor,
            idle_overhead_s=self.idle_overhead_s * factor,
            source=f"{self.source}, steps x {factor:g}",
            loop=None if self.loop is None else self.loop.scaled(factor),
        )

    def extrapolation(self, trace: Trace) -> Extrapolation | None:
        """How far ``trace``'s steps (a simulation's, another run's) lie beyond the steps this model
        was fitted on (``modkit.sim.coverage``); None for a model fitted on no recording."""
        if self.coverage is None:
            return None
        steps = [e for worker_steps in _steps_by_worker(trace).values() for e in worker_steps]
        rows = [[step_features(e.scheduled)[name] for name in FEATURES] for e in steps]
        return self.coverage.of(np.asarray(rows, dtype=float).reshape(-1, len(FEATURES)))

    def pace(self, trace: Trace) -> float:
        """How long ``trace``'s steps took against what this model prices them at, as a factor
        of how the fit's own steps did (the median of ``spread``): 1.3 where they took 30% longer,
        as on a machine that much slower than in the fit; about 1 for the trace it was fitted on.
        ``scaled(pace(trace))`` is this model at that run's pace: where a prediction at that pace
        comes close and the one at the fit's pace does not, the miss was the machine's speed.

        Only the steps a fitted model knows count: those like its recording's (``coverage``), so
        that a pace measures the machine and not how the model carries to other steps. They are
        compared as ``fit`` fitted them (sums of busy steps in a row: pairs on the CPU; on a GPU
        a prompt step with the steps either side), each priced as ``simulate`` prices it: on the
        threads the trace's launch ran it on, stretched for the other workers computing beside
        it, and its overhead (``overhead``; a run too light for busy rows has idle steps in its
        rows). ValueError if the trace has no such steps."""
        if self.loop is not None:
            pace = self.loop.launch_pace(trace, lambda e: step_features(e.scheduled))
            if pace is not None:
                return pace
        steps = _steps_by_worker(trace)
        x, y, is_idle, tokens = _timed_steps(steps)
        if not len(y):
            raise ValueError("the trace has no steps to compare with the model's prices")
        num_workers = int(trace.meta.get("num_workers") or len(steps))
        setting = trace.meta.get("cpu_parallel_min_tokens") or 1  # a trace that does not say ran all on all threads
        scales: dict[int, dict[str, float]] = {}
        predicted = np.empty(len(y))
        for i, (features, num_tokens) in enumerate(zip(x, tokens, strict=True)):
            if num_tokens not in scales:
                scales[num_tokens] = self.thread_scale(num_workers, num_tokens, setting)
            named = dict(zip(FEATURES, features, strict=True))
            predicted[i] = self.forward_time(named, scale=scales[num_tokens]) + self.overhead(bool(is_idle[i]))
        if len(steps) > 1:
            predicted *= [self.sharing(1.0 + busy) for busy in _others_busy(steps)]
        rows = _launch_ahead_rows if str(trace.meta.get("device", "")).startswith("cuda") else _pair_rows
        row, member = rows(x, is_idle)
        known = (
            np.ones(len(y), dtype=bool) if self.coverage is None else self.coverage.leverage(x) <= self.coverage.edge
        )
        kept = np.bincount(row, weights=~known[member]) == 0  # rows of known steps only
        priced = _row_sums(predicted, row, member)
        kept &= priced > 0
        if not np.any(kept):
            raise ValueError(f"none of the trace's {len(y)} steps is like those the model was fitted on")
        ratio = float(np.median(_row_sums(y, row, member)[kept] / priced[kept]))
        return ratio / float(np.median(self.spread)) if self.spread else ratio

    def describe(self) -> dict[str, Any]:
        """What it is, as plain values (a trace's meta keeps it)."""
        error = self.fit_error
        return {
            "source": self.source,
            "terms": self.terms,
            "step_overhead_s": self.step_overhead_s,
            "idle_overhead_s": self.idle_overhead_s,
            "plan": self.plan,
            "admit_s": self.admit_s,
            "output_s": self.output_s,
            "output_delay_samples": len(self.output_delays),
            "fit_error": None if error is None else dataclasses.asdict(error),
            "spread_samples": len(self.spread),
            "fitted_on": self.fitted_on,
            "cpu_share": None if self.cpu_share is None else self.cpu_share.describe(),
            "cpu_demand": self.cpu_demand,
            "coverage": None if self.coverage is None else self.coverage.describe(),
            "loop": None if self.loop is None else self.loop.describe(),
            **self.info,
        }

    def __repr__(self) -> str:
        terms = " | ".join(", ".join(f"{k}={v:.3g}" for k, v in t.items() if v) for t in self.terms)
        e = self.fit_error
        error = "" if e is None else f", error p50 {e.median:.0%} p90 {e.p90:.0%} (floor {1e3 * e.floor_s:.2g} ms)"
        if e is not None and e.price_range != (1.0, 1.0):
            error += f", price {e.price_range[0]:.2f} to {e.price_range[1]:.2f} of the fit within the run"
        overheads = f"overhead {self.step_overhead_s:.3g} s (+{self.idle_overhead_s:.3g} s idle)"
        if self.plan:
            overheads += "; plan " + ", ".join(f"{k}={v:.3g}" for k, v in self.plan.items() if v)
        latencies = f"admit {self.admit_s:.3g} s, output {self.output_s:.3g} s"
        if self.cpu_demand is not None:  # on the CPU: what sharing the cores with other workers costs
            latencies += f"; a busy worker wants {self.cpu_demand:.2f} cores"
        loop = "" if self.loop is None else f"; {self.loop!r}"
        return f"CostModel({self.source}: {terms}; {overheads}; {latencies}{error}{loop})"

    # -- from a live run ---------------------------------------------------------------------

    @classmethod
    def fit(cls, trace: Trace, cpu_share: CpuShare | None = None) -> CostModel:
        """Fit one linear term on the steps of ``trace`` (robustly, coefficients >= 0), the idle
        overhead and the two latencies (see the module docstring); ``cpu_share``, measured on the
        CPU the trace ran on, lets a simulation price another share of its cores.

        What is fitted is each step's time as the scheduler saw it: when its result came back
        minus when the worker could start it (the plan was sent, or the step before came back,
        whichever is later). With async scheduling steps overlap, and this is the gap between
        their results, what a request waits between two tokens. The hops between processes are
        part of it, so a fitted model's ``step_overhead_s`` is 0: they are in its ``step``
        coefficient. The coefficients come from the steps planned ahead (the worker was busy),
        fitted on sums of steps in a row (see below); the steps sent to an idle worker give
        ``idle_overhead_s``, the median of what they took beyond the fit. The scheduler's work
        on each step before its plan left (``schedule_s``, with its round trips to the KV cache
        manager) gives ``plan``. On a run of several workers on the CPU a step's time is its
        price alone times the stretch ``sharing`` gives it for the other workers computing
        during it, under the ``cpu_demand`` that fits best (``_fit_sharing``).

        NOTE: which steps are fitted together. On a GPU a step's cost can show in its
        neighbours' gaps: the worker prepares a step while the GPU still runs the one before.
        Fitted one by one, the prompt steps looked like outliers and their cost was lost (TTFT
        p50 predicted 32% short on an H100). Steps in a row add up to their costs however their
        times are split between them, so the fit is on sums of steps in a row on a busy worker
        (a linear model's prediction for a sum is the sum of its steps'); ``spread`` is measured
        on those sums too. Which steps:

        - on a GPU (``_launch_ahead_rows``), each prompt step with the step before it and the
          step after it, every other step alone. Where a prompt step's host work shows depends
          on when its plan reached the worker. With a step in flight, the worker launches the
          prompt step before it returns that step's result: the work shows in the step before's
          gap (on an H100, 2026-12-07, the median of a run 4.5 to 6.6 ms, then 0.6 to 0.8 ms for
          the prompt step itself). With none in flight, it shows in its own (1.1 to 1.3 ms, then
          3.9 to 6.1 ms). Either way the step after takes 1.9 to 2.4 ms, against 1.4 to 1.7 ms
          for a decode step among decode steps. Both ways come in streaks within every run.
          Pairs of steps hold the whole of it one way round only; the robust fit took the other
          way's pairs for stalls and priced a prompt step a quarter short of what its three gaps
          held (TTFT p50 11 to 14% short in three configurations). The rows around it price it
          as the gaps do; how many predictions that brings within 10% depends on how much the
          fit run's prompt steps cost against the other runs' (docs/benchmarks.md, H100 D
          and E);
        - on the CPU, each pair of steps in a row. A CPU step runs where it is timed; rows
          around each prompt step, replayed on five saved fidelity calls of the 2-core box,
          brought 21 of their 50 latency medians within 10% of the live ones, pairs 23.
        """
        block_size = int(trace.meta.get("block_size") or 16)
        steps = _steps_by_worker(trace)
        x, y, is_idle, _ = _timed_steps(steps)
        worker = [worker_id for worker_id, worker_steps in steps.items() for _ in worker_steps]
        every_step = [e for worker_steps in steps.values() for e in worker_steps]
        plan_rows = [[plan_features(e, block_size)[name] for name in PLAN_FEATURES] for e in every_step]
        plan_s = [e.schedule_s for e in every_step]
        fitted_on = {k: trace.meta[k] for k in FITTED_ON if trace.meta.get(k) is not None}
        launches_ahead = str(fitted_on.get("device", "")).startswith("cuda")
        row, member = (_launch_ahead_rows if launches_ahead else _pair_rows)(x, is_idle)
        if len(np.unique(row)) < len(FEATURES):
            raise ValueError(f"{len(y)} steps in the trace: too few to fit {len(FEATURES)} coefficients")
        yw = np.bincount(row, weights=y[member])
        if len(steps) > 1 and fitted_on.get("device") == "cpu" and fitted_on.get("usable_cores"):
            # Workers that shared the CPU: each step priced alone, times its stretch (see _fit_sharing).
            demand, stretch = _fit_sharing(
                x, yw, (row, member), _others_busy(steps), int(fitted_on["usable_cores"]), len(steps)
            )
        else:
            demand, stretch = _cpu_demand(trace, busy_s=float(np.sum(y))), np.ones(len(y))
        xw = _row_sums(x * stretch[:, None], row, member)
        coefficients, row_weights = robust_nonnegative_fit(xw, yw)
        predicted = (x @ coefficients) * stretch
        idle_overhead = max(float(np.median(y[is_idle] - predicted[is_idle])), 0.0) if np.any(is_idle) else 0.0
        # Each step's weight: the most of its rows' (a stall spoils every row it is in, a neighbour's not all).
        weights = np.ones(len(y))
        weights[np.unique(member)] = 0.0
        np.maximum.at(weights, member, row_weights[row])
        plan, _ = robust_nonnegative_fit(np.asarray(plan_rows), np.asarray(plan_s))
        predicted_w = xw @ coefficients
        priced = predicted_w > 0
        ratios = yw[priced] / predicted_w[priced]
        first = np.full(len(yw), len(y))
        np.minimum.at(first, row, member)  # each row's first step: its worker
        price_range = _price_range(ratios, np.asarray(worker)[first][priced])
        error = FitError.of(predicted + idle_overhead * is_idle, y, weights, price_range)
        admit_s, output_delays = _latencies(trace)
        return cls(
            [{name: float(c) for name, c in zip(FEATURES, coefficients, strict=True)}],
            idle_overhead_s=idle_overhead,
            plan={name: float(c) for name, c in zip(PLAN_FEATURES, plan, strict=True)},
            admit_s=admit_s,
            output_s=_median(output_delays),
            output_delays=output_delays,
            source=f"fit on {len(y)} steps",
            fit_error=error,
            spread=[float(r) for r in ratios],
            fitted_on=fitted_on,
            cpu_share=cpu_share,
            cpu_demand=demand,
            coverage=Coverage.of_steps(FEATURES, x),
            loop=_with_plan_spread(
                fit_loop(trace, lambda e: step_features(e.scheduled), FEATURES), plan_rows, plan_s, plan
            )
            if launches_ahead
            else None,
        )

    # -- from the hardware's spec sheet --------------------------------------------------------

    @classmethod
    def roofline(cls, model_config: ModelConfig, gpu: str = "H100", dtype_bytes: int = 2) -> CostModel:
        """Compute and memory terms for ``model_config`` on ``gpu`` (a key of ``GPUS``), weights of ``dtype_bytes``."""
        if gpu not in GPUS:
            raise ValueError(f"unknown gpu {gpu!r}; known: {', '.join(GPUS)}")
        spec = GPUS[gpu]
        m = model_config
        q_dim, kv_dim = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
        attention_params = m.hidden_size * (q_dim + 2 * kv_dim) + q_dim * m.hidden_size  # q, k, v, o
        per_layer = attention_params + 3 * m.hidden_size * m.intermediate_size  # and gate, up, down
        num_params = m.num_hidden_layers * per_layer + m.vocab_size * m.hidden_size  # the lm_head
        flops_per_token = 2 * num_params  # a multiply and an add per weight
        attention_flops = 4 * m.num_hidden_layers * q_dim  # QK^T and PV, per query-key pair
        kv_bytes_per_token = 2 * m.num_hidden_layers * kv_dim * dtype_bytes  # K and V
        compute = {
            "num_prompt_tokens": flops_per_token / spec.flops,
            "prompt_attention_tokens": attention_flops / spec.flops,
            "num_decode_tokens": flops_per_token / spec.flops,
            "decode_context_tokens": attention_flops / spec.flops,
        }
        memory = {
            "step": num_params * dtype_bytes / spec.bandwidth,  # every weight read once a step
            "decode_context_tokens": kv_bytes_per_token / spec.bandwidth,
            "num_prompt_tokens": kv_bytes_per_token / spec.bandwidth,  # written once
        }
        info = {"gpu": gpu, "gpu_source": spec.source, "num_params": num_params}
        return cls([compute, memory], source=f"roofline on {gpu}", info=info)


@dataclass(frozen=True, slots=True)
class GPUSpec:
    flops: float  # dense bf16 FLOP/s (without sparsity)
    bandwidth: float  # HBM bytes/s
    source: str


GPUS = {
    "H100": GPUSpec(989e12, 3.35e12, "NVIDIA H100 SXM5 datasheet: 989 TFLOPS bf16 dense, 3.35 TB/s HBM3"),
    "H200": GPUSpec(989e12, 4.8e12, "NVIDIA H200 SXM datasheet: 989 TFLOPS bf16 dense, 4.8 TB/s HBM3e"),
    "A100": GPUSpec(312e12, 2.039e12, "NVIDIA A100 80GB SXM datasheet: 312 TFLOPS bf16 dense, 2,039 GB/s HBM2e"),
}


def _with_plan_spread(
    loop: WorkerLoop | None, plan_rows: list[list[float]], plan_s: list[float], plan: np.ndarray
) -> WorkerLoop | None:
    """``loop`` with each fitted plan's measured over fitted time, apart for the plans with a KV
    round trip and those without (``WorkerLoop.plan_spread``)."""
    if loop is None:
        return None
    rows, measured = np.asarray(plan_rows), np.asarray(plan_s)
    fitted = rows @ plan
    kv = rows[:, PLAN_FEATURES.index("kv_round_trip")] > 0
    spread = {
        name: [float(r) for r in measured[chosen & (fitted > 0)] / fitted[chosen & (fitted > 0)]]
        for name, chosen in (("kv_round_trip", kv), ("local", ~kv))
    }
    return dataclasses.replace(loop, plan_spread=spread)


def _steps_by_worker(trace: Trace) -> dict[int, list[StepEvent]]:
    steps: dict[int, list[StepEvent]] = {}
    for e in trace.events:
        if isinstance(e, StepEvent) and e.failed is None:
            steps.setdefault(e.worker_id, []).append(e)
    return {w: sorted(s, key=lambda e: e.step) for w, s in steps.items()}


def _timed_steps(steps: dict[int, list[StepEvent]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Each step's features, its time as the scheduler saw it (its result back minus when the
    worker could start it: the plan was sent, or the step before came back, whichever is later),
    whether its worker was idle when it was sent, and its tokens; by worker, then by step."""
    rows, wall_s, idle, tokens = [], [], [], []
    for worker_steps in steps.values():
        prev_end = -np.inf
        for e in worker_steps:
            end = e.started + e.step_s
            rows.append([step_features(e.scheduled)[name] for name in FEATURES])
            wall_s.append(end - max(e.started, prev_end))
            idle.append(e.started >= prev_end)
            tokens.append(e.tokens_used)
            prev_end = end
    x = np.asarray(rows, dtype=float).reshape(-1, len(FEATURES))
    return x, np.asarray(wall_s, dtype=float), np.asarray(idle, dtype=bool), tokens


def _pair_rows(x: np.ndarray, is_idle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``CostModel.fit``'s rows on the CPU: each pair of steps in a row on a busy worker (every
    pair where hardly any is), as (row, step) pairs: row r is the sum of the steps
    ``member[row == r]``. A worker's first step counts as idle, so a busy pair never spans two
    workers."""
    starts = np.arange(len(is_idle) - 1)
    busy = starts[~(is_idle[starts] | is_idle[starts + 1])]
    starts = busy if len(busy) >= len(FEATURES) else starts
    row = np.repeat(np.arange(len(starts)), 2)
    return row, np.stack([starts, starts + 1], axis=1).reshape(-1)


def _launch_ahead_rows(x: np.ndarray, is_idle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``CostModel.fit``'s rows on a GPU: each step alone, but a prompt step together with the
    busy steps just before and after it (its host work shows in their gaps), as ``_pair_rows``
    gives them. Steps join the rows of busy steps only (every row where hardly any is)."""
    if not len(is_idle):
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    prompt = x[:, FEATURES.index("prompt_step")] > 0
    # Step i+1 joins step i's row when it is busy and one of the two is a prompt step.
    joins = ~is_idle[1:] & (prompt[:-1] | prompt[1:])
    row = np.concatenate([[0], np.cumsum(~joins)])
    idle_rows = np.unique(row[is_idle])
    busy = ~np.isin(row, idle_rows)
    if len(np.unique(row[busy])) >= len(FEATURES):
        row, member = np.unique(row[busy], return_inverse=True)[1], np.flatnonzero(busy)
    else:
        member = np.arange(len(row))
    return row, member


def _row_sums(values: np.ndarray, row: np.ndarray, member: np.ndarray) -> np.ndarray:
    """Each row's sum of ``values`` (one per step) over its steps."""
    sums = np.zeros((int(row.max()) + 1, *values.shape[1:]))
    np.add.at(sums, row, values[member])
    return sums


def _price_range(ratios: np.ndarray, workers: np.ndarray) -> tuple[float, float]:
    """The p10 and p90 of the medians of ``PRICE_WINDOW`` ratios in a row (measured over fitted
    time of the fit's rows, in each worker's order); the median of all of them on a worker with
    fewer."""
    medians = []
    for worker_id in np.unique(workers):
        own = ratios[workers == worker_id]
        if len(own) < PRICE_WINDOW:
            medians.append(float(np.median(own)))
            continue
        rolled = np.lib.stride_tricks.sliding_window_view(own, PRICE_WINDOW)
        medians.extend(np.median(rolled, axis=1).tolist())
    if not medians:
        return (1.0, 1.0)
    return float(np.percentile(medians, 10)), float(np.percentile(medians, 90))


def _others_busy(steps: dict[int, list[StepEvent]]) -> np.ndarray:
    """For each step (in ``fit``'s order: by worker, then by step), how many other workers were
    computing during it, on average over it: each one's steps, back to back, cover its busy time."""
    spans = {}
    for worker_id, worker_steps in steps.items():
        begins, finishes, prev_end = [], [], -np.inf
        for e in worker_steps:
            end = e.started + e.step_s
            begins.append(max(e.started, prev_end))
            finishes.append(end)
            prev_end = end
        spans[worker_id] = (np.asarray(begins), np.asarray(finishes))
    busy = []
    for worker_id, (starts, ends) in spans.items():
        for start, end in zip(starts, ends, strict=True):
            overlap = 0.0
            for other, (o_starts, o_ends) in spans.items():
                if other != worker_id:  # its spans are in order and apart: only those from i to j meet this one
                    i, j = np.searchsorted(o_ends, start, "right"), np.searchsorted(o_starts, end, "left")
                    meet = np.minimum(o_ends[i:j], end) - np.maximum(o_starts[i:j], start)
                    overlap += float(np.sum(np.clip(meet, 0.0, None)))
            busy.append(overlap / (end - start) if end > start else 0.0)
    return np.asarray(busy)


def _fit_sharing(
    x: np.ndarray,
    yw: np.ndarray,
    rows: tuple[np.ndarray, np.ndarray],
    others_busy: np.ndarray,
    cores: int,
    num_workers: int,
) -> tuple[float | None, np.ndarray]:
    """The ``cpu_demand`` under which processor sharing (``CostModel.sharing``) best explains a run
    of ``num_workers`` workers on ``cores``, and each step's stretch under it.

    Such a run's CPU seconds cannot be split between the workers' steps, but its steps say how
    much longer a step took beside busy workers than alone: each candidate demand, from
    ``cores / num_workers`` (below it the workers never run short) to all the cores, stretches
    each step by ``sharing(1 + others_busy)``; the fit on the steps priced alone and stretched
    so that misses the rows' times least (median relative miss) wins. None, and no stretch,
    where no sharing fits better than none."""
    best: tuple[float, float | None, np.ndarray] = (np.inf, None, np.ones(len(x)))
    lowest = cores / num_workers
    candidates = [lowest + (cores - lowest) * k / SHARING_STEPS for k in range(1, SHARING_STEPS + 1)]
    for demand in [None, *candidates]:
        stretch = np.ones(len(x)) if demand is None else processor_sharing(1.0 + others_busy, demand, cores)
        xw = _row_sums(x * stretch[:, None], *rows)
        coefficients = np.linalg.lstsq(xw, yw, rcond=None)[0]  # to compare candidates: fast, and the miss is robust
        miss = float(np.median(np.abs(xw @ coefficients - yw) / yw))
        if miss < best[0]:
            best = (miss, demand, stretch)
    return best[1], best[2]


def processor_sharing(busy: Any, demand: float, cores: int) -> Any:
    """How much longer a step takes while ``busy`` workers (a number, or an array of them) want
    ``demand`` cores each of ``cores``, than one worker alone (``modkit.sim.cpu_share``)."""
    return np.maximum(1.0, np.asarray(busy) * demand / cores) / max(1.0, demand / cores)


def _cpu_demand(trace: Trace, busy_s: float) -> float | None:
    """The CPU seconds every process used over the trace (``meta["cpu_s"]``, a launch records
    them) per second a worker was busy: the cores a busy worker keeps busy, with the work of
    the other processes for its steps. None if not recorded, or fitted on several workers
    (their shares of it are not told apart)."""
    cpu = trace.meta.get("cpu_s")
    if not cpu or busy_s <= 0 or trace.meta.get("num_workers", 1) != 1:
        return None
    return float(sum(cpu.values())) / busy_s


def _latencies(trace: Trace) -> tuple[float, list[float]]:
    """The median of a request's arrival at the frontend to its scheduler (``_admit_times``); and
    each ``TokensOut``'s time at the frontend since the last step's result came back to the
    scheduler, in order."""
    steps = _steps_by_worker(trace)
    ends = np.sort([step.started + step.step_s for s in steps.values() for step in s])
    outputs = []
    for event in trace.events:
        if isinstance(event, TokensOut) and len(ends):
            i = int(np.searchsorted(ends, event.ts, side="right")) - 1
            if i >= 0:
                outputs.append(float(event.ts - ends[i]))
    return _median(_admit_times(trace, steps)), outputs


def _admit_times(trace: Trace, steps: dict[int, list[StepEvent]]) -> list[float]:
    """Each request's arrival at the frontend to its arrival at the scheduler (``Queued``).

    NOTE: a trace recorded before the scheduler published ``Queued`` has only the first step
    that scheduled each request. That is the admission only for a request that arrived while
    its worker had nothing in flight: under load those are few, and early in the run."""
    arrived = {e.req_id: e.ts for e in trace.events if isinstance(e, RequestArrived)}
    queued: dict[str, float] = {}
    for e in trace.events:
        if isinstance(e, Queued) and e.req_id in arrived:
            queued.setdefault(e.req_id, e.ts)
    if queued:
        return [queued[r] - arrived[r] for r in queued]
    first_step: dict[str, tuple[int, float]] = {}  # req_id -> (worker, when its first step was sent)
    for worker_id, worker_steps in steps.items():
        for step in worker_steps:
            for r in step.scheduled:
                first_step.setdefault(r.req_id, (worker_id, step.started))
    admits = []
    for req_id, ts in arrived.items():
        if req_id in first_step:
            worker_id, scheduled_at = first_step[req_id]
            if not _in_flight_at(steps[worker_id], ts):
                admits.append(scheduled_at - ts)
    return admits


def _in_flight_at(steps: list[StepEvent], t: float) -> bool:
    """Whether one of ``steps`` (in the order they were sent) was in flight at ``t``."""
    starts = [s.started for s in steps]
    i = bisect.bisect_right(starts, t)  # the steps sent by t; a worker's steps end in the order sent
    return i > 0 and steps[i - 1].started + steps[i - 1].step_s > t


def _median(values: Sequence[float]) -> float:
    return max(float(np.median(values)), 0.0) if len(values) else 0.0
