"""``WorkerLoop``: a GPU worker's loop, timed, so that a simulated step's result comes back when the live one would.

On a GPU a step's time is not its own: the worker launches a plan as soon as it arrives, and
only then finishes the step before it (``modkit.worker.service``). Whether a plan arrives
before the device is done with the step in flight decides how two steps overlap::

    plan on time   launch c (host) | finish b (wait for the device, tokens to the host, send)
                                     the device runs c while the host finishes b
    plan late      finish b | ... wait for c's plan ... | launch c | wait for c on the device | finish c
                                     nothing overlaps: the step takes the host's and the device's time

On an H100 (2026-12-07, 0.5B model) a decode step whose plan left the scheduler 0.8 ms or
more before the step in flight came back took 0.8 to 1.9 ms, one whose plan left 0.4 ms or
less before took 2.1 to 3.3 ms (the medians of 0.2 ms bins, over five configurations), and
almost none fell between. With a small KV pool the scheduler asks the KV cache manager on
every step (0.6 ms of planning against 0.05 ms), and 31 to 43% of its decode steps were late
against 9 to 13% in the base runs. A cost model that prices a step by its features alone
prices the mix of the run it was fitted on: over five H100 calls, a small pool's steps took 8
to 37% longer than a fit on a base run priced them.

``WorkerLoop`` replays the loop itself (``LoopWorker``, the same code for the fit and for
``modkit.sim.simulate``), with:

    launch          the host's time to launch a step's forward: a linear function of its
                    features (``modkit.sim.cost_model.FEATURES``), fitted on each step's measured
                    ``ForwardEvent.forward_s``; a prompt step's eager attention layers are here
    sample_launch_s the host's time to launch the sampling after it
    device          the device's time for a step beyond its launch: a linear function of
                    ``DEVICE_FEATURES``
    finish_s        the host's time to finish a step once the device is done with it: the tokens
                    to the host, the result sent, the events published
    hop_in_s        a plan leaving the scheduler to the worker taking it, when the worker is free
    hop_out_s       a result sent to the scheduler having it
    replan_s        a result at the scheduler to the scheduler starting on the next plan
                    (``update_from_output``, the tokens sent on), beyond the planning itself

``launch``, ``hop_in_s`` and ``replan_s`` are measured directly on the trace. The others are
fitted by replaying the trace's own plans, as they left the scheduler, through ``LoopWorker``,
so that the replayed launches and results come when the trace's did (``fit_loop``). The
simulator draws each plan's hop and planning time from those the fit measured (``hops_in``,
``plan_spread``): whether a plan comes late depends on their tails, not on their medians.

NOTE: what a trace does not tell apart. The time from a launch's end to the result at the
scheduler is the sampling's launch, the finish and the hop back, and a trace shows their sum,
not how it splits: fits on four runs of one H100 call put 0.04 to 0.36 ms on the sampling's
launch, with the three together 0.2 to 0.5 ms, each replaying its run's results within 0.1 to
0.2 ms at the median. Where few plans come late, the device's time is as loosely held.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from modkit.sim.regression import robust_nonnegative_fit
from modkit.trace.events import ForwardEvent, StepEvent

if TYPE_CHECKING:
    from modkit.trace.trace import Trace

DEVICE_FEATURES = ("num_prompt_tokens", "num_seqs", "step")
MISS_CAP_S = 3e-3  # a replayed time further off than this counts as this far (a stall is not the loop's)
SEARCH_FLOOR_S = 2e-6  # the fit's coordinate search stops at steps this small


@dataclass(slots=True)
class LoopStep:
    """One plan through the worker's loop; the times are filled in as the loop gets to them."""

    key: Any  # whatever the caller tells its steps apart by
    arrival: float  # the plan reached the worker
    launch_s: float  # host time to launch its forward
    device_s: float  # device time beyond the launch
    launched_at: float = float("nan")  # the worker began launching it
    device_done: float = float("nan")  # the device finished it
    sent_at: float = float("nan")  # its result left the worker


class LoopWorker:
    """The worker's ``run_once`` loop (``modkit.worker.service``) on a clock.

    Each turn takes every plan that has arrived; for each, it finishes the launched steps the
    device is done with, launches the plan, and finishes every launched step but the newest
    (waiting for the device). Then it finishes the newest if the device is done with it. With
    nothing to do, it looks again when the next plan arrives or the device finishes a step.
    The device runs a step once its launch is over and the step before is done. ``on_sent``
    hears of each step as its result leaves, in the order the steps arrived."""

    def __init__(self, sample_launch_s: float, finish_s: float, on_sent: Callable[[LoopStep], None]) -> None:
        self.sample_launch_s, self.finish_s, self.on_sent = sample_launch_s, finish_s, on_sent
        self.inbox: deque[LoopStep] = deque()
        self.launched: deque[LoopStep] = deque()
        self.host_free = -np.inf  # the host is done with what it began
        self.device_free = -np.inf  # the device is done with every step launched

    def arrive(self, step: LoopStep) -> None:
        self.inbox.append(step)

    def turn(self, now: float) -> float | None:
        """Do what the loop does at ``now`` (the host is free by then), until it has to wait;
        the time it looks again, or None with nothing arrived, nothing in flight."""
        t = max(now, self.host_free)
        while True:
            arrived = []  # what one drain of the inbox takes
            while self.inbox and self.inbox[0].arrival <= t:
                arrived.append(self.inbox.popleft())
            for step in arrived:
                while self.launched and self.launched[0].device_done <= t:
                    t = self._finish(t)
                step.launched_at = t
                t += step.launch_s + self.sample_launch_s
                step.device_done = self.device_free = max(t, self.device_free) + step.device_s
                self.launched.append(step)
                while len(self.launched) > 1:
                    t = self._finish(t)
            if self.launched and self.launched[0].device_done <= t:
                t = self._finish(t)
            elif not arrived:
                break
        self.host_free = t
        waits = [self.inbox[0].arrival] if self.inbox else []
        if self.launched:
            waits.append(self.launched[0].device_done)
        return max(min(waits), t) if waits else None

    def _finish(self, t: float) -> float:
        step = self.launched.popleft()
        step.sent_at = max(t, step.device_done) + self.finish_s
        self.on_sent(step)
        return step.sent_at


def replay(
    arrivals: Iterable[float],
    launch_s: Iterable[float],
    device_s: Iterable[float],
    sample_launch_s: float,
    finish_s: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Plans arriving at ``arrivals`` (in order) through a ``LoopWorker``: when each step's launch
    began, and when its result left."""
    steps = [LoopStep(i, a, ls, ds) for i, (a, ls, ds) in enumerate(zip(arrivals, launch_s, device_s, strict=True))]
    worker = LoopWorker(sample_launch_s, finish_s, lambda step: None)
    for step in steps:
        worker.arrive(step)
    t: float | None = steps[0].arrival if steps else None
    while t is not None:
        t = worker.turn(t)
    return np.array([s.launched_at for s in steps]), np.array([s.sent_at for s in steps])


@dataclass(frozen=True, slots=True)
class WorkerLoop:
    """A GPU worker's loop, timed (see the module docstring): what ``LoopWorker`` needs for each
    step, fitted on a trace by ``fit_loop`` (``CostModel.fit`` does it on a GPU trace)."""

    launch: dict[str, float]  # FEATURES -> seconds: the host's time to launch a step's forward
    device: dict[str, float]  # DEVICE_FEATURES -> seconds: the device's time beyond the launch
    sample_launch_s: float
    finish_s: float
    hop_in_s: float
    hop_out_s: float
    replan_s: float = 0.0
    launch_spread: list[float] = field(default_factory=list)  # measured / fitted launch times
    # Measured / fitted planning times (CostModel.plan), for plans with a KV round trip and without ("local").
    plan_spread: dict[str, list[float]] = field(default_factory=dict)
    hops_in: list[float] = field(default_factory=list)  # each measured hop in (hop_in_s is their median)
    result_miss_s: float = 0.0  # median |replayed - live| result time at the scheduler, over the fit's steps
    launch_miss_s: float = 0.0  # the same for the launches' starts

    def launch_time(self, features: dict[str, float], rng: random.Random | None = None) -> float:
        """The host's time to launch a step with these features; with ``rng``, times one of ``launch_spread``."""
        fitted = sum(c * features.get(name, 0.0) for name, c in self.launch.items())
        return fitted * rng.choice(self.launch_spread) if rng is not None and self.launch_spread else fitted

    def hop_in(self, rng: random.Random | None = None) -> float:
        """A plan's hop to the worker; with ``rng``, one of those measured (``hops_in``)."""
        return rng.choice(self.hops_in) if rng is not None and self.hops_in else self.hop_in_s

    def device_time(self, features: dict[str, float]) -> float:
        return sum(c * features.get(name, 0.0) for name, c in self.device.items())

    def worker(self, on_sent: Callable[[LoopStep], None]) -> LoopWorker:
        return LoopWorker(self.sample_launch_s, self.finish_s, on_sent)

    def scaled(self, factor: float) -> WorkerLoop:
        """Each step's host and device times ``factor`` times as long; the hops keep theirs."""
        return dataclasses.replace(
            self,
            launch={k: v * factor for k, v in self.launch.items()},
            device={k: v * factor for k, v in self.device.items()},
            sample_launch_s=self.sample_launch_s * factor,
            finish_s=self.finish_s * factor,
        )

    def launch_pace(self, trace: Trace, step_features: Callable[[StepEvent], dict[str, float]]) -> float | None:
        """How long ``trace``'s launches took against this loop's prices, as a factor of how the
        fit's own did (the median of ``launch_spread``); None without forward events."""
        timed = _timed(trace)
        if not timed:
            return None
        fitted = np.array([self.launch_time(step_features(e)) for e, _ in timed])
        measured = np.array([f.forward_s for _, f in timed])
        kept = fitted > 0
        if not np.any(kept):
            return None
        ratio = float(np.median(measured[kept] / fitted[kept]))
        return ratio / float(np.median(self.launch_spread)) if self.launch_spread else ratio

    def describe(self) -> dict[str, Any]:
        """What it is, as plain values; of the measured samples, how many (a trace's meta keeps it)."""
        samples = {
            "launch_spread": len(self.launch_spread),
            "plan_spread": {k: len(v) for k, v in self.plan_spread.items()},
            "hops_in": len(self.hops_in),
        }
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in samples}
        return {**values, "launch": dict(self.launch), "device": dict(self.device), **samples}

    def __repr__(self) -> str:
        launch = ", ".join(f"{k}={v * 1e3:.3g}" for k, v in self.launch.items() if v)
        device = ", ".join(f"{k}={v * 1e3:.3g}" for k, v in self.device.items() if v)
        return (
            f"WorkerLoop(ms: launch {launch}; sample launch {self.sample_launch_s * 1e3:.3g}; device {device}; "
            f"finish {self.finish_s * 1e3:.3g}; hops {self.hop_in_s * 1e3:.3g} in, {self.hop_out_s * 1e3:.3g} out; "
            f"replan {self.replan_s * 1e3:.3g}; replayed results off by {self.result_miss_s * 1e3:.2g} ms, median)"
        )


def _timed(trace: Trace) -> list[tuple[StepEvent, ForwardEvent]]:
    """The trace's steps with their forward events, of its first worker, in order."""
    forwards = {(e.worker_id, e.step): e for e in trace.events if isinstance(e, ForwardEvent) and e.failed is None}
    steps = sorted(
        (e for e in trace.events if isinstance(e, StepEvent) and e.failed is None),
        key=lambda e: (e.worker_id, e.step),
    )
    if not steps:
        return []
    first = steps[0].worker_id
    return [
        (e, forwards[(e.worker_id, e.step)])
        for e in steps
        if e.worker_id == first and (e.worker_id, e.step) in forwards
    ]


def fit_loop(
    trace: Trace, features: Callable[[StepEvent], dict[str, float]], names: Sequence[str]
) -> WorkerLoop | None:
    """Fit a ``WorkerLoop`` on ``trace`` (one worker's steps with their forward events); None
    without enough of them (a trace recorded without forward events).

    ``launch``: a robust fit of each step's ``forward_s`` on ``names`` of ``features(step)``.
    ``hop_in_s``: the median time from a plan leaving to its launch, over the plans that found
    the worker with nothing in flight (the step before had come back). ``replan_s``: the median
    time from a result at the scheduler to the plan after next leaving, beyond that plan's
    ``schedule_s`` (the result's ``update_s`` included), over the plans made on a result. The rest by a
    coordinate search that replays the trace's plans, sent when they were sent, and minimises
    the mean miss of the replayed launches and results (each capped at ``MISS_CAP_S``)."""
    timed = _timed(trace)
    if len(timed) < 4 * len(names):
        return None
    x = np.array([[features(e)[n] for n in names] for e, _ in timed])
    forward = np.array([f.forward_s for _, f in timed])
    coefficients, _ = robust_nonnegative_fit(x, forward)
    launch = {n: float(c) for n, c in zip(names, coefficients, strict=True)}
    fitted = x @ coefficients
    spread = [float(r) for r in forward[fitted > 0] / fitted[fitted > 0]]
    sent = np.array([e.started for e, _ in timed])
    back = np.array([e.started + e.step_s for e, _ in timed])
    launched = np.array([f.started for _, f in timed])
    idle = np.concatenate([[True], sent[1:] > back[:-1]])
    hops_in = np.maximum(launched[idle] - sent[idle], 0.0)
    hop_in = float(np.median(hops_in))
    after = [  # plan i+2 made on step i's result, while step i+1 was in flight
        sent[i + 2] - back[i] - timed[i + 2][0].schedule_s
        for i in range(len(timed) - 2)
        if back[i] < sent[i + 2] and sent[i + 1] < back[i]
    ]
    replan = max(float(np.median(after)), 0.0) if after else 0.0
    device_x = np.array([[features(e)[n] for n in DEVICE_FEATURES] for e, _ in timed])
    arrivals = sent + hop_in

    def miss(v: np.ndarray) -> float:
        sample_launch, finish, hop_out, *device = v
        starts, results = replay(arrivals, forward, device_x @ np.asarray(device), sample_launch, finish)
        return float(
            np.mean(np.minimum(np.abs(results + hop_out - back), MISS_CAP_S))
            + np.mean(np.minimum(np.abs(starts - launched), MISS_CAP_S))
        )

    median_gap = float(np.median(np.diff(back))) if len(back) > 1 else 1e-3
    v = np.array([0.2, 0.2, 0.1, 0.0, 0.0, 0.4]) * median_gap  # sample launch, finish, hop out; device
    v = _coordinate_search(miss, v, step=0.25 * median_gap)
    sample_launch, finish, hop_out, *device = v.tolist()
    starts, results = replay(arrivals, forward, device_x @ np.asarray(device), sample_launch, finish)
    return WorkerLoop(
        launch=launch,
        device={n: float(c) for n, c in zip(DEVICE_FEATURES, device, strict=True)},
        sample_launch_s=sample_launch,
        finish_s=finish,
        hop_in_s=hop_in,
        hops_in=[float(h) for h in hops_in],
        hop_out_s=hop_out,
        replan_s=replan,
        launch_spread=spread,
        result_miss_s=float(np.median(np.abs(results + hop_out - back))),
        launch_miss_s=float(np.median(np.abs(starts - launched))),
    )


def _coordinate_search(f: Callable[[np.ndarray], float], v: np.ndarray, step: float) -> np.ndarray:
    """Minimise ``f`` over ``v >= 0``: try each coordinate a step up and down, keep what helps,
    halve the step when nothing does, until it is under ``SEARCH_FLOOR_S``."""
    best = f(v)
    while step >= SEARCH_FLOOR_S:
        moved = False
        for i in range(len(v)):
            for sign in (1.0, -1.0):
                trial = v.copy()
                trial[i] = max(trial[i] + sign * step, 0.0)
                if trial[i] == v[i]:
                    continue
                value = f(trial)
                if value < best:
                    best, v, moved = value, trial, True
                    break
        if not moved:
            step /= 2
    return v
