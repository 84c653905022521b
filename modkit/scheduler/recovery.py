"""The scheduler process's side of a restart elsewhere: a lost KV pool, a request sent twice.

``SchedulerService`` takes this mixin, so its own file keeps the step loop and its messages.

A KV cache manager that restarted (or stopped answering) has lost a worker's pool: the
client raises or notes ``KVCacheLost`` (``modkit.kvcache.client``). Then every request of
that worker is taken as a preemption takes it (outputs kept, ``num_computed_tokens`` 0, to
be recomputed when readmitted), its steps in flight are forgotten (their results are ignored
when they come back), and its next plan names them preempted, so the worker drops its
copies. Once the manager answers again, ``rejoin`` resets the pool under a new generation
and scheduling goes on; until then the worker gets no plan, and messages are taken as usual.

After a router or scheduler restart the frontend sends every request in flight again
(``resubmit``): a request this scheduler has, or finished lately, is not added twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modkit.transport import RemoteError, RpcTimeoutError

if TYPE_CHECKING:
    from modkit.scheduler.slots import WorkerSlot
    from modkit.transport import RpcClient

MAX_RECENTLY_FINISHED = 10_000  # finished req_ids remembered, so that a resubmitted copy is not run again


class SchedulerRecovery:
    """``_kv_ready`` before every plan, ``_requeue_all`` when a pool is lost, ``_finished`` for every request."""

    # Set by SchedulerService.__init__.
    kv_rpc: RpcClient
    owner: dict[str, int]  # req_id -> worker id, while the request lives
    recently_finished: dict[str, None]  # the last MAX_RECENTLY_FINISHED, oldest first

    def _kv_ready(self, slot: WorkerSlot) -> bool:
        """Whether the worker's KV pool can be used: after a loss, once its requests are requeued and
        the manager answers again (``rejoin``, which resets the pool)."""
        if slot.kv.lost is None:
            return True
        if not slot.requeued:
            self._requeue_all(slot)
        if not slot.kv.rejoin():
            return False
        slot.requeued = False
        return True

    def _requeue_all(self, slot: WorkerSlot) -> None:
        """The KV cache manager lost the worker's pool: every request waits again, as a preemption leaves it
        (outputs kept, nothing computed), and the steps in flight are forgotten (their results are ignored)."""
        slot.kv.forget_all()
        slot.requeued = True
        slot.in_flight.clear()
        slot.num_kv_rebuilds += 1
        scheduler = slot.scheduler
        if scheduler.kv is not slot.kv:
            return  # vLLM's scheduler keeps its own KV cache manager, which was not lost
        taken = scheduler.take_requests(sorted(scheduler.requests, key=lambda r: scheduler.requests[r].arrival_time))
        for request in taken:
            request.num_preemptions += 1
            scheduler.add_request(request)
        scheduler.num_preemptions += len(taken)
        slot.to_drop |= {r.req_id for r in taken}

    def _reset_prefix_cache(self, slot: WorkerSlot) -> None:
        """The worker's cache is empty: so must the pool's prefix cache be (a lost pool is reset when rejoined)."""
        if slot.kv.lost is not None:
            return
        try:
            self.kv_rpc.call("reset_prefix_cache", slot.worker_id)
        except (RpcTimeoutError, RemoteError) as error:
            slot.kv.lose(f"reset_prefix_cache failed: {error}")

    def _is_known(self, req_id: str) -> bool:
        """Whether the request is here, or finished lately: an AddRequest for it was sent again (resubmit)."""
        return req_id in self.owner or req_id in self.recently_finished

    def _finished(self, req_id: str) -> None:
        """The request is over here: remembered a while, so that a copy sent again is not run again."""
        self.owner.pop(req_id, None)
        self.recently_finished[req_id] = None
        if len(self.recently_finished) > MAX_RECENTLY_FINISHED:
            del self.recently_finished[next(iter(self.recently_finished))]
