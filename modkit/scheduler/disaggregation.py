"""Disaggregated prefill and decode in the scheduler process: where a prompt runs, and the hand-over.

::

    router --AddRequest(decode worker d)--> scheduler
        prompt uncached on d > max_local_prefill_length, a prefill worker's queue < max_prefill_queue_size?
        no:  d computes the prompt itself (as an aggregated worker would)
        yes: prefill worker p gets a copy with max_tokens=1; its connector marks it to save
    worker-p --StepDone(its prompt computed; the blocks kept there)--> scheduler
        the copy's token is dropped; d's Scheduler gets the request, with "p holds its prompt"
        d's admission: local prefix hit h, then blocks for tokens h ... n-2 to load from p,
        and only the last prompt token to compute (its logits give the first output token)
    worker-d reads the blocks from worker-p before that step's forward (modkit.kvtransfer)

The decision is Dynamo's conditional disaggregation, made where the queues are known: the
router's estimate of what worker d caches comes with the ``AddRequest``. A prefill worker
that dies, or whose step fails, hands its prompts back to their decode workers, which compute
them; a read that fails is computed on the decode worker (``modkit.kvtransfer.worker_side``).
Nothing is lost either way.
"""

from __future__ import annotations

from modkit.kvtransfer.scheduler_side import SchedulerConnector
from modkit.protocol import AddRequest
from modkit.request import Request, RequestStatus
from modkit.sampling_params import SamplingParams
from modkit.scheduler.output import EngineCoreOutput
from modkit.scheduler.slots import WorkerSlot


class SchedulerDisaggregation:
    """The part of ``SchedulerService`` that gives workers roles (a mixin; nothing without roles)."""

    slots: list[WorkerSlot]
    block_size: int

    def _setup_roles(self, roles: list[str], max_local_prefill_length: int, max_prefill_queue_size: int) -> None:
        self.roles = roles  # per worker: "prefill", "decode" or "both"
        self.disaggregated = any(role != "both" for role in roles)
        self.max_local_prefill_length = max_local_prefill_length
        self.max_prefill_queue_size = max_prefill_queue_size
        self.prefilling: dict[str, tuple[int, Request]] = {}  # req_id -> (prefill worker, the request for decode)
        self.num_remote_prefills = 0
        self.num_local_prefills = 0
        self.num_prefills_lost = 0  # prompts a prefill worker lost (it died, its step failed): computed on decode
        for slot, role in zip(self.slots, roles, strict=True):
            if role != "both":
                slot.scheduler.connector = SchedulerConnector(role, self.block_size)

    def _connector(self, slot: WorkerSlot) -> SchedulerConnector:
        connector = slot.scheduler.connector
        assert connector is not None
        return connector

    def _prefill_slot(self, message: AddRequest, request: Request, decode: WorkerSlot) -> WorkerSlot | None:
        """The prefill worker to compute the prompt, or None: the decode worker computes it."""
        if self.roles[decode.worker_id] != "decode" or request.num_output_tokens:
            return None  # aggregated; or moved off a dead worker with outputs: recomputed where it goes
        if request.sampling_params.prompt_logprobs is not None:
            return None  # every prompt position's logits are needed where the request generates
        uncached = len(request.prompt_token_ids) - message.num_cached_blocks * self.block_size
        prefill = [s for s in self.slots if self.roles[s.worker_id] == "prefill" and s.alive]
        if uncached <= self.max_local_prefill_length or not prefill:
            self.num_local_prefills += 1
            return None
        chosen = min(prefill, key=lambda s: (len(s.scheduler.waiting), len(s.scheduler.running)))
        if len(chosen.scheduler.waiting) >= self.max_prefill_queue_size:
            self.num_local_prefills += 1
            return None
        return chosen

    def _start_prefill(self, prefill: WorkerSlot, request: Request) -> None:
        """Queue a copy of the request on the prefill worker: its prompt, one token (dropped)."""
        copy = Request(
            request.req_id,
            list(request.prompt_token_ids),
            SamplingParams(max_tokens=1),
            request.eos_token_ids,
            arrival_time=request.arrival_time,
            priority=request.priority,
        )
        prefill.scheduler.add_request(copy)  # ValueError as the decode worker's would (same limits)
        self._connector(prefill).to_save.add(request.req_id)
        self.prefilling[request.req_id] = (prefill.worker_id, request)
        self.num_remote_prefills += 1

    def _prefilled(self, prefill: WorkerSlot, outputs: list[EngineCoreOutput]) -> list[Request]:
        """A prefill worker's step came back: its finished prompts go to their decode workers.

        Returns those whose decode worker is gone (to be routed again)."""
        orphans = []
        for output in outputs:
            if output.finish_reason is None or output.req_id not in self.prefilling:
                continue
            _, request = self.prefilling.pop(output.req_id)
            decode = self.slots[self._decode_worker_of(request.req_id)]
            if not decode.alive:
                orphans.append(request)
                continue
            self._connector(decode).add_remote(request.req_id, prefill.worker_id, request.num_prompt_tokens)
            decode.scheduler.add_request(request)
        return orphans

    def _prefill_lost(self, req_ids: list[str]) -> list[Request]:
        """A prefill worker died or failed a step: its prompts are computed by their decode workers."""
        orphans = []
        for req_id in req_ids:
            entry = self.prefilling.pop(req_id, None)
            if entry is None:
                continue
            request = entry[1]
            self.num_prefills_lost += 1
            decode = self.slots[self._decode_worker_of(req_id)]
            if decode.alive:
                decode.scheduler.add_request(request)
            else:
                orphans.append(request)
        return orphans

    def _abort_prefill(self, req_id: str) -> None:
        """The request ended (an abort, a stop), maybe while its prompt was still on a prefill worker."""
        entry = self.prefilling.pop(req_id, None)
        if entry is not None:
            prefill = self.slots[entry[0]]
            prefill.scheduler.finish_requests([req_id], RequestStatus.FINISHED_ABORTED)
            self._connector(prefill).request_finished(req_id)
        for slot in self.slots:
            if slot.scheduler.connector is not None:
                slot.scheduler.connector.request_finished(req_id)

    def _decode_worker_of(self, req_id: str) -> int:
        raise NotImplementedError  # SchedulerService: its owner map
