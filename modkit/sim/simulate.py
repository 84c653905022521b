"""``simulate``: a workload through the real scheduler, KV cache manager and router, on a simulated clock.

::

    trace = simulate(workload, cost_model, num_kv_blocks=64, scheduling_policy="sjf")
    trace.summary(); viz.dashboard(trace)

Only the model is missing. The objects that decide are the ones that serve: a ``Router``
picks each request's worker, and each worker has a ``Scheduler`` with its own
``KVCacheManager``, built from a ``PipelineConfig`` exactly as the scheduler and KV cache
manager processes build theirs. Instead of running a forward, a step takes the time the
cost model gives it, and each request that samples gets a made-up token
(``modkit.scheduler.simulate``); a request finishes at its recorded length.

The clock is a queue of timed events (discrete-event simulation), as the scheduler process
would see them::

    arrival      the frontend sends the request on (RequestArrived); the router picks a worker (Routed);
                 admit_s later it reaches that worker's scheduler (Queued)
    step done    a step's result is back: update_from_output, then the next plans; an output
                 delay later its tokens reach the frontend (TokensOut, RequestDone)

The output delays are the fit's (``CostModel.output_delays``), taken in runs of consecutive
ones: each step the next of the fit's, or, one step in ``OUTPUT_RUN``, one picked at random
(a model without them: ``output_s`` each time).

After each, the worker is planned for as ``SchedulerService.run_once`` does it, async
scheduling included: a plan when nothing is in flight, and one more ahead while one is. How a
worker runs its steps depends on where the cost model was fitted:

- On the CPU a worker runs its steps one after another: a step starts when it is planned or
  when the worker's previous step ends, whichever is later, and lasts the cost model's forward
  time and overhead. A CPU step computes where it is timed, so its time is its own.
- On a GPU (a cost model with a ``loop``), the worker's loop is simulated
  (``modkit.sim.worker_loop``): a plan reaches the worker a hop after it leaves, the worker
  launches it when its host is free, and a step's result leaves when the loop finishes it,
  which waits for the device and, with a plan in time, comes after the next step's launch. A
  plan that arrives after the device is done with the step in flight overlaps nothing, and
  its step takes the host's and the device's time one after the other. Each plan takes the
  fit's planning time for its features times one of the fit's measured ratios for such a plan
  (``WorkerLoop.plan_spread``): which plans come late depends on the tail of the planning
  time, not on its median.

NOTE: why the loop and not a price per step on a GPU. Priced per step, a fit prices the mix of
plans on time and late of the run it was fitted on. On an H100 (2026-12-07, 0.5B model) 9 to
13% of a base run's decode steps were late and 31 to 43% of a small KV pool's, whose every
plan asks the KV cache manager (0.6 ms of planning against 0.05 ms). Over five H100 calls a
small pool's steps took 8 to 37% longer than a fit on a base run priced them; on the last,
its throughput came out 22% high and its TTFT 44% short. A fixed wait for a step planned less
than a fitted lead ahead, tried before the loop, made three of four calls' own fits worse: a
step is late when its plan comes after the device is done with the step before, not after
the step's whole gap, so the simulation had a small pool's late steps but too few of a base
run's (7% against 17%). Replayed with the loop on the last call's saved traces, the same fit
gave the small pool's throughput +3%, TTFT +1% and ITL -6%. On another call, whose fit run
was the first traffic of a machine started a minute before and planned a KV round trip in
1.25 ms where the later runs took 0.5 to 0.6 ms, the loop carried that slow planning to every
plan: the small pool came out 39% slow, against 21% priced per step (docs/benchmarks.md,
"Simulation fidelity on a GPU").

On the CPU the workers share the cores (``modkit.sim.cpu_share``). With a cost model fitted on
the CPU, each step is priced at the threads a step of its size runs on in a launch of this
many workers (one under ``cpu_parallel_min_tokens`` tokens, else each worker's share of the
cores), over those it ran on in the fit (``CostModel.thread_scale``, with a measured
``CpuShare``), and stretched while other workers
are busy (``CostModel.sharing``, from the fit's ``cpu_demand``)::

    forward = cost_model.forward_time(features, scale=thread_scale) x cost_model.sharing(busy)
    busy    = 1 + the number of other workers with requests to serve
              + for each other one without: the part of this forward before its last step
                in flight ends, over the forward

A worker with requests keeps stepping until they are done, so it counts for the whole
forward, though only its next step or two are planned. A worker that gets its first request
after this step was planned does not stretch it back (its own steps are stretched for the
overlap). On a GPU every worker runs its own loop, as on a device of its own.

The events it records are the live pipeline's (StepEvent, ForwardEvent, BlockEvents,
RequestArrived, Routed, Queued, TokensOut, RequestDone), so the result is an ordinary ``Trace``,
whose ``meta`` says ``simulated: True`` and which cost model timed it. It is a simulation:
its times are as good as the cost model, and the hops between processes are two constants.
With a fitted cost model, ``meta["extrapolation"]`` says how many of the simulated steps are
unlike any the fit was measured on (``modkit.sim.coverage``): the share of the answer that rests on
extrapolation.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

from modkit.config import ConfigError, PipelineConfig, cpu_parallel_min_tokens
from modkit.kvcache.manager import KVCacheManager
from modkit.request import Request, RequestStatus
from modkit.router.router import Router
from modkit.scheduler.output import StepRecord
from modkit.scheduler.scheduler import Scheduler
from modkit.scheduler.simulate import SimulatedWorker
from modkit.scheduler.step import never_fits_message, waits_for_ever
from modkit.sim.cost_model import CostModel, step_features
from modkit.sim.launch import launch_pool
from modkit.sim.worker_loop import LoopStep
from modkit.sim.workload import Workload, WorkloadRequest
from modkit.trace.events import (
    BlockActivity,
    BlockEvents,
    ForwardEvent,
    PipelineEvent,
    Queued,
    RequestArrived,
    RequestDone,
    Routed,
    StepEvent,
    TokensOut,
    step_event,
)
from modkit.trace.trace import Trace, event_time

# Steps an output delay's run lasts on average: the fit's delays in a row this long, then a jump.
OUTPUT_RUN = 8


def simulate(workload: Workload, cost_model: CostModel, **overrides: Any) -> Trace:
    """Serve ``workload`` on a simulated clock; ``overrides`` are ``PipelineConfig`` fields.

    The settings start from those the workload was recorded with (``workload.config``), then
    ``overrides``; an unknown field raises ``ConfigError``. Without ``num_kv_blocks`` each
    worker gets the pool a launch on the CPU would give it (``modkit.sim.launch``: from the
    model's shapes, ``model`` and ``dtype`` included). Other fields that do not change a schedule
    (ports, the sampler...) are accepted and ignored; ``seed`` seeds the draws from the cost
    model's spread, so one seed gives one trace.
    """
    settings = {**workload.config, **overrides}
    config = PipelineConfig(**settings)
    if config.disaggregated:  # its workers all do both: a trace of roles it cannot draw would mislead
        raise ConfigError(
            "prefill_workers", "the simulator models aggregated workers only; set it and decode_workers to 0"
        )
    # Each worker's pool and the length limit, as a launch of this configuration would have them.
    num_blocks, max_model_len = launch_pool(config, explicit_max_model_len=overrides.get("max_model_len") is not None)
    config = dataclasses.replace(config, num_kv_blocks=num_blocks, max_model_len=max_model_len)
    return Simulation(config, max_model_len, cost_model).run(workload)


@dataclass(slots=True)
class StepTiming:
    """A step in flight on the simulated clock."""

    record: StepRecord
    started: float  # the plan was sent (planned: the cost model's plan_time after the scheduler could start)
    ready: float  # the worker could start it
    forward_s: float
    end: float  # its result is back at the scheduler
    num_sampled: int
    plan_s: float  # the scheduler's work on it before it was sent
    sample_s: float = 0.0  # the worker's, beyond the forward (with a WorkerLoop: launch, wait, finish)


class SimWorker:
    """One worker: its scheduler and KV cache manager (the real ones), and when it is free."""

    def __init__(self, worker_id: int, config: PipelineConfig, max_model_len: int, sim: Simulation) -> None:
        self.worker_id = worker_id
        self.activity: list[BlockActivity] = []  # what the KV cache manager did since the last flush
        assert config.num_kv_blocks is not None, "simulate() gives each worker a launch's pool (launch_pool)"
        self.kv = KVCacheManager(
            config.num_kv_blocks,
            config.block_size,
            config.enable_prefix_caching,
            event_sink=lambda event: sim.router.on_kv_event(worker_id, event),
            activity_sink=lambda kind, req_id, block_ids: self.activity.append(BlockActivity(kind, req_id, block_ids)),
            eviction_policy=config.eviction_policy,
        )
        self.scheduler = Scheduler(
            self.kv, config.max_num_batched_tokens, config.max_num_seqs, max_model_len, config.scheduling_policy
        )
        self.scheduler.policy.clock = lambda: sim.now  # a policy that ages requests reads the simulated clock
        self.driver = SimulatedWorker(self.scheduler, config.async_scheduling)
        self.timings: deque[StepTiming] = deque()  # one per step in self.driver.in_flight
        self.free_at = 0.0  # when its last step in flight ends
        # A cost model with a WorkerLoop (fitted on a GPU): the worker's loop decides when results leave.
        loop = sim.cost_model.loop
        self.loop = None if loop is None else loop.worker(lambda step: sim._sent(self, step))
        self.wake_at: float | None = None  # when the loop looks again (None: it waits for a plan)


class Simulation:
    """One run on the simulated clock: the router, the workers, the queue of timed events, what it recorded."""

    def __init__(self, config: PipelineConfig, max_model_len: int, cost_model: CostModel) -> None:
        self.config, self.max_model_len, self.cost_model = config, max_model_len, cost_model
        self.router = Router(config.num_workers, config.block_size, config.router_policy)
        self.workers = [SimWorker(i, config, max_model_len, self) for i in range(config.num_workers)]
        self.now = 0.0
        self.planner_free_at = 0.0  # when the scheduler is done planning the steps sent so far
        self.rng = random.Random(config.seed)  # draws each step's spread (CostModel.spread)
        self.output_rng = random.Random(f"{config.seed}/outputs")  # walks the fit's output delays
        self._output_at: int | None = None  # which of them the last step took
        self._thread_scales: dict[tuple[int, int] | None, dict[str, float]] = {}  # by step_threads
        self.events: list[PipelineEvent] = []
        self._queue: list[tuple[float, int, str, Any]] = []  # (time, tie-break, kind, what)
        self._order = itertools.count()

    def run(self, workload: Workload) -> Trace:
        for i, request in enumerate(workload.requests):
            self._at(request.arrival_s, "arrival", (f"sim-{i}", request))
        while self._queue:
            self.now, _, kind, what = heapq.heappop(self._queue)
            if kind == "arrival":
                self._arrival(*what)
            elif kind == "add":
                self._add(*what)
            elif kind == "wake":
                self._wake(*what)
            else:
                self._step_done(what)
        self.events.sort(key=event_time)  # in time order, as a recorder receives them
        trace = Trace(self.events, self._meta())
        beyond = self.cost_model.extrapolation(trace)  # how far its steps lie beyond the fit's recording
        trace.meta["extrapolation"] = None if beyond is None else dataclasses.asdict(beyond)
        return trace

    def _at(self, t: float, kind: str, what: Any) -> None:
        heapq.heappush(self._queue, (t, next(self._order), kind, what))

    # -- the frontend and the router ---------------------------------------------------------

    def _arrival(self, req_id: str, request: WorkloadRequest) -> None:
        prompt, params = request.prompt_token_ids, request.sampling_params
        arrived = RequestArrived(self.now, req_id, req_id, len(prompt), params.max_tokens, prompt, params)
        self.events.append(arrived)
        worker_id = self.router.route(req_id, prompt)
        seen = self.router.last_seen
        num_blocks = -(-len(prompt) // self.config.block_size)
        cached = {w: c for w, (c, _) in seen.items()}
        active = {w: a for w, (_, a) in seen.items()}
        self.events.append(Routed(self.now, req_id, worker_id, self.config.router_policy, num_blocks, cached, active))
        self._at(self.now + self.cost_model.admit_s, "add", (worker_id, req_id, request))

    # -- the scheduler process ---------------------------------------------------------------

    def _add(self, worker_id: int, req_id: str, request: WorkloadRequest) -> None:
        worker = self.workers[worker_id]
        params = dataclasses.replace(request.sampling_params, max_tokens=request.output_len, ignore_eos=True)
        try:
            worker.scheduler.add_request(Request(req_id, request.prompt_token_ids, params, arrival_time=self.now))
        except ValueError as error:
            self._done(req_id, "rejected", str(error), self.now)
            return
        self.events.append(Queued(self.now, req_id, worker_id))
        self._plan(worker)

    def _plan(self, worker: SimWorker) -> None:
        """What ``SchedulerService.run_once`` does for one worker: a step if none is in flight,
        and one more ahead (async scheduling) while one is."""
        if not worker.driver.in_flight and worker.scheduler.has_unfinished_requests():
            self._send_step(worker)
        if worker.driver.may_plan_ahead():
            self._send_step(worker)
        self._flush_blocks(worker)

    def _send_step(self, worker: SimWorker) -> None:
        """Plan a step and put it on the worker, unless it tells the worker nothing (as ``_send_step``)."""
        scheduler = worker.scheduler
        while True:
            step = worker.driver.plan()
            plan = step.plan
            refused = self._refuse_if_never_fits(worker, plan)
            if plan.total_num_scheduled_tokens or plan.finished_req_ids or plan.preempted_req_ids:
                break
            worker.driver.in_flight.pop()  # not sent
            if not refused:
                return
        record = scheduler.last_record
        assert record is not None
        if worker.loop is not None:
            self._send_to_loop(worker, record, len(step.sampling))
            return
        idle = len(worker.driver.in_flight) == 1  # nothing else in flight
        # The one scheduler process plans every worker's steps, one after another.
        plan_s = self.cost_model.plan_time(record, self.config.block_size)
        sent = self.planner_free_at = max(self.now, self.planner_free_at) + plan_s
        ready = max(sent, worker.free_at)
        forward_s = self.cost_model.forward_time(
            step_features(record.scheduled), self.rng, self._thread_scale(record.tokens_used)
        )
        if len(self.workers) > 1:
            forward_s *= self.cost_model.sharing(1.0 + self._overlap(worker, ready, forward_s))
        end = ready + forward_s + self.cost_model.overhead(idle)
        worker.free_at = end
        worker.timings.append(StepTiming(record, sent, ready, forward_s, end, len(step.sampling), plan_s))
        self._at(end, "step_done", worker.worker_id)

    def _send_to_loop(self, worker: SimWorker, record: StepRecord, num_sampled: int) -> None:
        """Send a plan to a worker whose loop is simulated (``modkit.sim.worker_loop``): it arrives
        a hop later, and its result leaves when the loop finishes it (``_sent``)."""
        loop, worker_loop = self.cost_model.loop, worker.loop
        assert loop is not None and worker_loop is not None
        plan_s = self.cost_model.plan_time(record, self.config.block_size, self.rng)
        sent = self.planner_free_at = max(self.now + loop.replan_s, self.planner_free_at) + plan_s
        features = step_features(record.scheduled)
        timing = StepTiming(record, sent, sent, 0.0, sent, num_sampled, plan_s)
        worker.timings.append(timing)
        arrival = sent + loop.hop_in(self.rng)
        worker_loop.arrive(LoopStep(timing, arrival, loop.launch_time(features, self.rng), loop.device_time(features)))
        self._wake_at(worker, arrival)

    def _wake_at(self, worker: SimWorker, t: float) -> None:
        if worker.wake_at is None or t < worker.wake_at:
            worker.wake_at = t
            self._at(t, "wake", (worker.worker_id, t))

    def _wake(self, worker_id: int, t: float) -> None:
        """The worker's loop takes a turn (a wake-up that a sooner one replaced does nothing)."""
        worker = self.workers[worker_id]
        if worker.wake_at != t or worker.loop is None:
            return
        worker.wake_at = None
        again = worker.loop.turn(self.now)
        if again is not None:
            self._wake_at(worker, again)

    def _sent(self, worker: SimWorker, step: LoopStep) -> None:
        """A step's result left the worker: it reaches the scheduler a hop later."""
        assert self.cost_model.loop is not None
        timing: StepTiming = step.key
        timing.ready, timing.forward_s = step.launched_at, step.launch_s
        timing.end = step.sent_at + self.cost_model.loop.hop_out_s
        timing.sample_s = step.sent_at - step.launched_at - step.launch_s
        self._at(timing.end, "step_done", worker.worker_id)

    def _thread_scale(self, num_tokens: int) -> dict[str, float]:
        """On the CPU, a step's cost at this launch's threads for its size over the fit's ({}: as fitted)."""
        cost, cfg = self.cost_model, self.config
        threads = cost.step_threads(num_tokens, cfg.num_workers, cfg.cpu_parallel_min_tokens)
        if threads not in self._thread_scales:
            self._thread_scales[threads] = cost.thread_scale(cfg.num_workers, num_tokens, cfg.cpu_parallel_min_tokens)
        return self._thread_scales[threads]

    def _overlap(self, worker: SimWorker, ready: float, forward_s: float) -> float:
        """How many other workers are busy during a forward from ``ready`` for ``forward_s``, on
        average over it: one with requests to serve for all of it, another for the part of it
        before its last step in flight ends."""
        if forward_s <= 0:
            return 0.0
        busy = sum(
            forward_s if other.scheduler.has_unfinished_requests() else min(max(other.free_at - ready, 0.0), forward_s)
            for other in self.workers
            if other is not worker
        )
        return busy / forward_s

    def _refuse_if_never_fits(self, worker: SimWorker, plan: Any) -> bool:
        stuck = waits_for_ever(worker.scheduler, plan)
        if stuck is None:
            return False
        message = never_fits_message(stuck, worker.scheduler)
        worker.scheduler.finish_requests([stuck.req_id], RequestStatus.FINISHED_ABORTED)
        self._done(stuck.req_id, "rejected", message, self.now)
        return True

    def _step_done(self, worker_id: int) -> None:
        worker = self.workers[worker_id]
        timing = worker.timings.popleft()
        outputs = worker.driver.finish_oldest()
        self.events.append(self._step_event(worker, timing))
        self._flush_blocks(worker)
        at_frontend = self.now + self._output_delay()
        if outputs:
            self.events.append(TokensOut(at_frontend, {o.req_id: len(o.new_token_ids) for o in outputs}))
        for output in outputs:
            if output.finish_reason is not None:
                self._done(output.req_id, output.finish_reason, None, at_frontend)
        self._plan(worker)

    def _output_delay(self) -> float:
        """A step's result at the scheduler to its tokens at the frontend: the next of the fit's
        delays, or one at random (one step in ``OUTPUT_RUN``, and the first)."""
        delays = self.cost_model.output_delays
        if not delays:
            return self.cost_model.output_s
        if self._output_at is None or self.output_rng.random() < 1.0 / OUTPUT_RUN:
            self._output_at = self.output_rng.randrange(len(delays))
        else:
            self._output_at = (self._output_at + 1) % len(delays)
        return delays[self._output_at]

    def _done(self, req_id: str, finish_reason: str, message: str | None, at: float) -> None:
        self.router.finish(req_id)
        self.events.append(RequestDone(at, req_id, finish_reason, message))

    # -- what the live pipeline would have published -------------------------------------------

    def _step_event(self, worker: SimWorker, timing: StepTiming) -> StepEvent:
        record = timing.record
        self.events.append(
            ForwardEvent(
                worker.worker_id,
                record.step,
                timing.ready,
                timing.forward_s,
                timing.sample_s,
                record.tokens_used,
                len(record.scheduled),
                timing.num_sampled,
            )
        )
        return step_event(
            record,
            worker_id=worker.worker_id,
            started=timing.started,
            step_s=timing.end - timing.started,
            schedule_s=timing.plan_s,
            forward_s=timing.forward_s,
            sample_s=timing.sample_s,
        )

    def _flush_blocks(self, worker: SimWorker) -> None:
        if worker.activity:
            self.events.append(
                BlockEvents(worker.worker_id, self.now, worker.activity, worker.kv.num_free_blocks, worker.kv.usage)
            )
            worker.activity = []

    def _meta(self) -> dict[str, Any]:
        cfg = self.config
        threads = self.cost_model.worker_threads(cfg.num_workers)
        split_from = cpu_parallel_min_tokens(cfg.cpu_parallel_min_tokens, threads or 1)
        return {
            "simulated": True,
            "cost_model": self.cost_model.describe(),
            "num_workers": cfg.num_workers,
            "num_blocks": [w.kv.pool.num_blocks for w in self.workers],
            "block_size": cfg.block_size,
            "max_num_batched_tokens": cfg.max_num_batched_tokens,
            "max_num_seqs": cfg.max_num_seqs,
            "max_model_len": self.max_model_len,
            "enable_prefix_caching": cfg.enable_prefix_caching,
            "async_scheduling": cfg.async_scheduling,
            "scheduling_policy": cfg.scheduling_policy,
            "eviction_policy": cfg.eviction_policy,
            "router_policy": cfg.router_policy,
            # The machine simulated: the fit's (CostModel.fitted_on), with this launch's threads.
            "device": self.cost_model.fitted_on.get("device"),
            "worker_threads": threads,
            "cpu_parallel_min_tokens": None if threads is None else split_from,
            "usable_cores": self.cost_model.fitted_on.get("usable_cores"),
            "t0": 0.0,
        }
