"""The scheduler process: one ``Scheduler`` per worker, each stepping its worker in turn.

::

    router --AddRequest(worker_id)--> scheduler.in
    for each worker with work and fewer than 2 steps in flight:
        plan = schedulers[i].schedule()       (allocations: KV cache manager, pool i, over RPC)
        worker-i.in <--StepPlan(plan)--
    worker-i --StepDone(sampled tokens)--> scheduler.in
        outputs = schedulers[i].update_from_output(plan, sampled)
        frontend.in <--EngineOutputs(outputs)--     router.in <--RequestsFinished--

Each worker has its own waiting and running queues and its own KV pool, so the workers
are independent replicas; while one runs its forward, the scheduler plans and updates
the others.

Async scheduling (``PipelineConfig.async_scheduling``, vLLM's name, on by default): a
worker's step N+1 is planned and sent while step N runs, its decodes' new tokens counted as
placeholders that the worker fills in with what it sampled (see ``modkit.scheduler.scheduler``).
So the worker finds its next plan waiting when a step ends, and the scheduler's update and
planning run while the worker computes, instead of between its steps. Without it, a step is
planned only after the previous one came back. Either way the next plan goes out before the
last step's results do: the outputs to the frontend, the finished ids to the router and the
step's event are sent while the worker computes.

Restarts elsewhere (``modkit.scheduler.recovery``): a KV pool the KV cache manager lost
has its requests recomputed, and a request sent again after a router or scheduler restart
is added only if it was lost. Every plan carries this process's
``scheduler_id``: a worker that sees a new one drops every request it holds, and results
tagged with another id (plans of the scheduler before a restart) are ignored here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from modkit.config import PipelineConfig
from modkit.kvcache.client import KVCacheLost, KVCacheManagerClient
from modkit.pipeline.addresses import PipelineAddresses, worker_name
from modkit.protocol import (
    AbortRequest,
    AddRequest,
    EngineOutputs,
    PipelineMessage,
    RequestRejected,
    RequestsFinished,
    StepDone,
    StepFailed,
    StepPlan,
    WorkerDown,
    WorkerUp,
)
from modkit.request import Request, RequestStatus
from modkit.scheduler.disaggregation import SchedulerDisaggregation
from modkit.scheduler.output import SchedulerOutput
from modkit.scheduler.recovery import SchedulerRecovery
from modkit.scheduler.scheduler import Scheduler
from modkit.scheduler.slots import InFlightStep, WorkerSlot
from modkit.scheduler.step import never_fits_message, waits_for_ever
from modkit.scheduler.swapping import SchedulerSwapping
from modkit.trace.events import EventPublisher, Queued, StepEvent, step_event
from modkit.transport import Inbox, Outbox, RpcClient

KV_RPC_TIMEOUT_S = 5.0  # calls other than apply (which has its own, see modkit.kvcache.client)


class SchedulerService(SchedulerSwapping, SchedulerRecovery, SchedulerDisaggregation):
    def __init__(self, config: dict[str, Any], ipc_dir: str, max_model_len: int, swap_key: str | None = None) -> None:
        cfg = PipelineConfig.from_dict(config)
        self.started = time.time()
        self.scheduler_id = uuid.uuid4().hex  # in every plan: the workers tell this process from the one before
        self.implementation = cfg.scheduling_policy
        self.scheduler_name = "modkit"  # whose scheduler: "modkit", or "vllm" (modkit.vllm_v1)
        self.previous_implementation = cfg.scheduling_policy  # shown again if a swapped-in policy is put aside
        self.swap_key = swap_key  # verifies classes sent by value (modkit.swap); None: none accepted
        self.last_swap_error: str | None = None
        addresses = PipelineAddresses(ipc_dir, cfg.addresses or {})
        self.inbox = Inbox(addresses.inbox("scheduler"), allow_remote=cfg.allow_remote)
        self.kv_rpc = RpcClient(addresses.rpc("kv_cache_manager"), KV_RPC_TIMEOUT_S)
        self.to_frontend = Outbox(addresses.inbox("frontend"))
        self.to_router = Outbox(addresses.inbox("router"))
        self.events = EventPublisher("scheduler", addresses.events("scheduler"), cfg.allow_remote)
        self.slots: list[WorkerSlot] = []
        for i in range(cfg.num_workers):
            kv = KVCacheManagerClient(self.kv_rpc, i, cfg.block_size)
            scheduler = Scheduler(
                kv, cfg.max_num_batched_tokens, cfg.max_num_seqs, max_model_len, cfg.scheduling_policy
            )
            self.slots.append(WorkerSlot(i, scheduler, kv, Outbox(addresses.inbox(worker_name(i)))))
        self.limits = (cfg.max_num_batched_tokens, cfg.max_num_seqs, max_model_len)
        self.block_size = cfg.block_size
        roles = [cfg.worker_role(i) for i in range(cfg.num_workers)]
        self._setup_roles(roles, cfg.max_local_prefill_length, cfg.max_prefill_queue_size)
        self.async_scheduling = cfg.async_scheduling
        self.block_size, self.enable_prefix_caching = cfg.block_size, cfg.enable_prefix_caching
        self.held: list[AddRequest] | None = None  # new requests kept back while draining (hold_new_requests)
        self.owner: dict[str, int] = {}  # req_id -> worker id, while the request lives
        self.recently_finished: dict[str, None] = {}  # the last MAX_RECENTLY_FINISHED, oldest first
        self.num_rejected = 0
        self.num_moved = 0  # requests moved off a dead worker
        self.after_steps: list[Callable[[], None]] = []  # sends owed by steps that came back (run_once)

    def wait_sockets(self) -> list[Inbox]:
        return [self.inbox]

    def run_once(self) -> bool:
        for message in self.inbox.drain():
            self._handle(message)
        for slot in self.slots:
            if not slot.alive:
                continue
            if not slot.in_flight:
                if slot.scheduler.has_unfinished_requests():
                    self._send_step(slot)  # its KV calls carry the last step's cache_blocks and frees
                else:
                    slot.kv.flush()  # idle: the KV cache manager (and its events) catch up now
            plan_ahead = len(slot.in_flight) == 1 and self._plans_ahead(slot) and slot.scheduler.can_plan_ahead()
            if plan_ahead and self._send_step(slot):  # step N+1, while the worker computes step N
                slot.num_planned_ahead += 1
        # What the finished steps' results owe others (outputs to the frontend, finished ids to
        # the router, step events) goes out now, while the workers compute their next steps.
        for send in self.after_steps:
            send()
        self.after_steps.clear()
        return False  # every worker is either stepping or idle: sleep until a message comes

    # -- messages ------------------------------------------------------------------------

    def _handle(self, message: PipelineMessage) -> None:
        if isinstance(message, StepDone):
            self._step_done(message)
        elif isinstance(message, StepFailed):
            self._step_failed(message)
        elif isinstance(message, AddRequest):
            self._add(message)
        elif isinstance(message, AbortRequest):
            self._abort(message)
        elif isinstance(message, WorkerDown):
            self._worker_down(message)
        elif isinstance(message, WorkerUp):
            slot = self.slots[message.worker_id]
            if not slot.alive:
                self._reset_prefix_cache(slot)  # a restarted worker's cache is empty
                slot.alive = True

    def _add(self, message: AddRequest) -> None:
        if self._is_known(message.req_id):
            return  # sent again after a restart (resubmit): this one was not lost
        if self.held is not None:
            self.held.append(message)
            return
        chosen = message.worker_id
        slot = self.slots[chosen] if chosen is not None and 0 <= chosen < len(self.slots) else None
        if slot is None or not slot.alive:
            self._reject(message.req_id, "unavailable", f"worker {message.worker_id} is not serving")
            return
        request = Request(
            message.req_id,
            list(message.prompt_token_ids),
            message.sampling_params,
            tuple(message.eos_token_ids),
            arrival_time=message.arrival_time,
            priority=message.priority,
        )
        for token in message.output_token_ids:  # moved here from a worker that died
            request.append_output_token_ids(token)
        prefill = self._prefill_slot(message, request, slot)  # disaggregation: None computes it here
        try:
            if prefill is None:
                slot.scheduler.add_request(request)
            else:
                self._start_prefill(prefill, request)
        except ValueError as error:
            self._reject(message.req_id, "invalid", str(error))
            return
        self.owner[message.req_id] = slot.worker_id
        if prefill is None:
            self.events.publish(f"queued.{slot.worker_id}", Queued(time.time(), message.req_id, slot.worker_id))

    def _abort(self, message: AbortRequest) -> None:
        status = RequestStatus.FINISHED_STOPPED if message.reason == "stop" else RequestStatus.FINISHED_ABORTED
        by_worker: dict[int, list[str]] = {}
        for req_id in message.req_ids:
            if self.disaggregated:
                self._abort_prefill(req_id)
            if req_id in self.owner:
                by_worker.setdefault(self.owner[req_id], []).append(req_id)
                self._finished(req_id)
        for worker_id, req_ids in by_worker.items():
            self.slots[worker_id].scheduler.finish_requests(req_ids, status)
        self.to_router.send(RequestsFinished([r for ids in by_worker.values() for r in ids]))

    def _reject(self, req_id: str, kind: str, message: str) -> None:
        self.num_rejected += 1
        self._finished(req_id)
        self.to_frontend.send(RequestRejected(req_id, kind, message))
        self.to_router.send(RequestsFinished([req_id]))

    def _worker_down(self, message: WorkerDown) -> None:
        """Move the dead worker's requests, with their outputs so far, back to the router for another worker."""
        slot = self.slots[message.worker_id]
        if not slot.alive:
            return
        slot.alive = False
        slot.in_flight.clear()
        moved = slot.scheduler.take_requests(list(slot.scheduler.requests))
        if self.roles[slot.worker_id] == "prefill":  # copies: their decode workers compute the prompts
            moved = self._prefill_lost([r.req_id for r in moved])
        for request in moved:
            self._route_again(request)
        self.num_moved += len(moved)
        self._reset_prefix_cache(slot)

    def _route_again(self, request: Request) -> None:
        """Send a request back to the router, with its outputs so far, for another worker."""
        self.owner.pop(request.req_id, None)
        self.to_router.send(
            AddRequest(
                request.req_id,
                request.prompt_token_ids,
                request.sampling_params,
                request.eos_token_ids,
                request.arrival_time,
                request.priority,
                output_token_ids=list(request.output_token_ids),
            )
        )

    # -- steps ---------------------------------------------------------------------------

    def _plans_ahead(self, slot: WorkerSlot) -> bool:
        """Async scheduling, with a scheduler that counts placeholders (modkit's; vLLM's is stepped in turn)."""
        return self.async_scheduling and isinstance(slot.scheduler, Scheduler)

    def _send_step(self, slot: WorkerSlot) -> bool:
        """Plan the worker's next step and send it; False if it would tell the worker nothing.

        Such a plan is not sent: the worker would answer at once, and the scheduler plan the
        same empty step again, for ever, at full speed. The scheduler waits for a message
        instead (a step's results, a new request, an abort). A request that a plan shows can
        never fit (``waits_for_ever``) is refused, and the next in line planned. Nothing is
        planned while the worker's KV pool is lost (its manager restarting: ``SchedulerRecovery``).
        """
        if not self._kv_ready(slot):
            return False  # the KV cache manager is not back yet: tried again on the next turn
        t0, kv0 = time.perf_counter(), slot.kv.round_trip_s
        while True:
            scheduler = slot.scheduler
            try:
                plan = scheduler.schedule()
            except KVCacheLost:
                self._requeue_all(slot)
                return False
            if slot.to_drop:  # requeued after a lost pool: the worker drops its copies (readmitted ones come back new)
                plan.preempted_req_ids |= slot.to_drop
                slot.to_drop = set()
            self._check_swapped_policy(slot)
            # A swapped-in scheduler that failed was taken over (modkit.scheduler.swapping): its last
            # plan preempts every request, which leaves nothing running for a reason of its own.
            taken_over = slot.scheduler is not scheduler
            refused = not taken_over and self._refuse_if_never_fits(slot, plan)
            if plan.total_num_scheduled_tokens or plan.finished_req_ids or plan.preempted_req_ids:
                break
            if not refused:
                return False
        sent_at = time.perf_counter()
        kv_s = slot.kv.round_trip_s - kv0
        slot.in_flight.append(InFlightStep(plan, slot.scheduler.last_record, sent_at, time.time(), sent_at - t0, kv_s))
        slot.schedule_s += sent_at - t0
        slot.outbox.send(StepPlan(slot.worker_id, plan, self.scheduler_id))
        return True

    def _refuse_if_never_fits(self, slot: WorkerSlot, plan: SchedulerOutput) -> bool:
        """Refuse (400) the request ``plan`` shows can never fit, if any; its id reaches the worker in the next plan."""
        stuck = waits_for_ever(slot.scheduler, plan)
        if stuck is None:
            return False
        message = never_fits_message(stuck, slot.scheduler)
        slot.scheduler.finish_requests([stuck.req_id], RequestStatus.FINISHED_ABORTED)
        self.owner.pop(stuck.req_id, None)
        self._reject(stuck.req_id, "invalid", message)
        return True

    def _came_back(self, slot: WorkerSlot, step: int, scheduler_id: str) -> InFlightStep | None:
        """The oldest step in flight, if it is ``step``; None for a step of a worker declared dead, come back
        late, one forgotten when the KV cache manager lost its pool, or one a scheduler before this one planned."""
        if scheduler_id != self.scheduler_id or not slot.in_flight or slot.in_flight[0].plan.step != step:
            return None
        return slot.in_flight.popleft()

    def _step_done(self, done: StepDone) -> None:
        slot = self.slots[done.worker_id]
        step = self._came_back(slot, done.step, done.scheduler_id)
        if step is None:
            return
        plan = step.plan
        elapsed = time.perf_counter() - step.sent_at
        slot.num_steps += 1
        slot.busy_s += elapsed
        slot.forward_s += done.forward_s
        slot.sample_s += done.sample_s
        t0 = time.perf_counter()
        outputs = slot.scheduler.update_from_output(plan, done.output)
        update_s = time.perf_counter() - t0
        slot.update_s += update_s
        event = self._step_event(slot, step, elapsed, done.forward_s, done.sample_s, update_s=update_s)
        if self.roles[slot.worker_id] == "prefill":  # its prompts go to their decode workers; no token leaves
            for request in self._prefilled(slot, outputs):
                self._route_again(request)
            if event is not None:
                self.after_steps.append(lambda: self.events.publish(f"step.{slot.worker_id}", event))
            return
        finished = [o.req_id for o in outputs if o.finish_reason is not None]
        for req_id in finished:
            self._finished(req_id)

        def send() -> None:
            if finished:  # the router first: a client's next request, sent on this reply, is routed knowing it
                self.to_router.send(RequestsFinished(finished))
            if outputs:
                self.to_frontend.send(EngineOutputs(outputs))
            if event is not None:
                self.events.publish(f"step.{slot.worker_id}", event)

        self.after_steps.append(send)  # after the worker's next step is on its way (run_once)

    def _step_failed(self, failed: StepFailed) -> None:
        """The worker could not run the step: its requests fail (503), the others carry on."""
        slot = self.slots[failed.worker_id]
        step = self._came_back(slot, failed.step, failed.scheduler_id)
        if step is None:
            return
        plan = step.plan
        slot.num_failed_steps += 1
        event = self._step_event(slot, step, time.perf_counter() - step.sent_at, 0.0, 0.0, failed.error)
        if event is not None:
            self.events.publish(f"step.{slot.worker_id}", event)
        req_ids = [r for r in plan.num_scheduled_tokens if r in slot.scheduler.requests]
        slot.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED)  # blocks freed, never cached
        if self.roles[slot.worker_id] == "prefill":  # copies: their decode workers compute the prompts
            for request in self._prefill_lost(req_ids):
                self._route_again(request)
            return
        for req_id in req_ids:
            self._reject(req_id, "error", f"{worker_name(slot.worker_id)} failed the step: {failed.error}")

    # -- swapping the whole scheduler (after a drain) ------------------------------------------

    def hold_new_requests(self, hold: bool) -> dict[str, int]:
        """Keep new requests back (``hold``) or let them in; how many are held, and how many unfinished.

        What ``Pipeline.swap`` drains with (requests already here finish, new ones wait here,
        in order, and are added once the hold ends), and ``Pipeline.hold_requests``.
        """
        if hold and self.held is None:
            self.held = []
        elif not hold and self.held is not None:
            held, self.held = self.held, None
            for message in held:
                self._add(message)
        return {"held": len(self.held or []), "unfinished": self.num_unfinished()}

    def num_unfinished(self) -> int:
        """Requests in the schedulers or in a step; at 0, the KV cache manager has been told every free."""
        count = sum(len(s.scheduler.requests) for s in self.slots if s.alive)
        count += sum(len(s.in_flight) for s in self.slots)
        if count == 0:
            for slot in self.slots:
                slot.kv.flush()
        return count

    # -- observing -----------------------------------------------------------------------

    def _step_event(
        self,
        slot: WorkerSlot,
        step: InFlightStep,
        step_s: float,
        forward_s: float,
        sample_s: float,
        failed: str | None = None,
        update_s: float = 0.0,
    ) -> StepEvent | None:
        """The step record of the step that just came back, with its timings."""
        record = step.record
        if record is None or not self.events.wants(f"step.{slot.worker_id}"):
            return None  # nobody listens: not even built
        return step_event(
            record,
            worker_id=slot.worker_id,
            started=step.sent_wall,
            step_s=step_s,
            schedule_s=step.schedule_s,
            forward_s=forward_s,
            sample_s=sample_s,
            failed=failed,
            kv_s=step.kv_s,
            update_s=update_s,
        )

    def announce_events(self, token: str) -> None:
        """Publish ``Hello(token)``: tells a new subscriber that its subscription arrived."""
        self.events.announce(token)

    def health(self) -> dict[str, Any]:
        alive = [s.worker_id for s in self.slots if s.alive]
        return {
            "status": "ok" if alive else "error",
            "component": "scheduler",
            "implementation": self.implementation,
            "scheduler": self.scheduler_name,
            "uptime_s": round(time.time() - self.started, 3),
            "workers_alive": alive,
            "last_swap_error": self.last_swap_error,
            **({} if alive else {"error": "no worker is alive"}),
        }

    def stats(self) -> dict[str, Any]:
        workers = [slot.stats() for slot in self.slots]
        return {
            "num_requests_running": sum(w["num_requests_running"] for w in workers),
            "num_requests_waiting": sum(w["num_requests_waiting"] for w in workers),
            "num_rejected": self.num_rejected,
            "num_moved": self.num_moved,
            "num_remote_prefills": self.num_remote_prefills,  # prompts computed on a prefill worker
            "num_local_prefills": self.num_local_prefills,  # on their decode worker (conditional disaggregation)
            "num_prefills_lost": self.num_prefills_lost,  # handed back by a prefill worker that died or failed
            "workers": workers,
        }

    def _decode_worker_of(self, req_id: str) -> int:
        return self.owner[req_id]

    def check_invariants(self) -> None:
        for slot in self.slots:
            if slot.alive:
                slot.scheduler.check_invariants()

    def close(self) -> None:
        self.inbox.close()
        self.kv_rpc.close()
        self.events.close()
        for outbox in (self.to_frontend, self.to_router, *(s.outbox for s in self.slots)):
            outbox.close()
