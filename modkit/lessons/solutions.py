"""One answer to each part of the skeletons (``modkit.lessons.skeleton``): look here only once you tried.

Each function is what the skeleton's method of the same name does in modkit's own scheduler
(``modkit/scheduler/scheduler.py``) or LRU policy (``modkit/kvcache/eviction.py``), written
with the skeleton's helpers. The lesson notebook's skeleton cell calls them, so that it runs
as it is: replace each call with your own code. ``ReferenceScheduler`` and ``ReferenceLRU``
are the skeletons filled with these answers.
"""

from __future__ import annotations

from collections.abc import Iterator

from modkit.kvcache.block_pool import KVCacheBlock
from modkit.lessons.skeleton import EvictionSkeleton, SchedulerSkeleton
from modkit.request import Request, RequestStatus
from modkit.scheduler.output import NO_FREE_BLOCKS
from modkit.scheduler.step import StepDraft

# -- the scheduler ----------------------------------------------------------------------------


def schedule_running(self: SchedulerSkeleton, step: StepDraft) -> None:
    for request in list(self.running):  # a copy: preemptions remove from self.running
        if request.status != RequestStatus.RUNNING:
            continue  # preempted earlier in this step, as another request's victim
        if step.budget == 0:
            step.note_out_of_budget(request)
            continue
        if self.last_token_in_flight(request):
            continue
        num_new = min(self.tokens_to_compute(request), step.budget)
        if self.allocate_or_preempt(request, num_new, step):
            step.schedule(request, num_new, "decode" if self.is_decode(request) else "prompt")


def allocate_or_preempt(self: SchedulerSkeleton, request: Request, num_new: int, step: StepDraft) -> bool:
    while self.kv.allocate_slots(request, num_new) is None:
        victim = self.policy.pick_victim(self.running)
        step.unschedule(victim)  # if it was scheduled earlier in this step, take that back
        self.preempt(victim)
        step.preempted[victim.req_id] = f"no free KV block for {request.req_id}"
        if victim is request:
            return False
    return True


def schedule_waiting(self: SchedulerSkeleton, step: StepDraft) -> None:
    if not self.waiting:
        return
    if step.preempted:  # blocks are short: admitting someone now would only preempt again
        step.note_waiting_queue(self.waiting, "preemption this step: no admissions")
        return
    candidates = self.waiting[: max(self.max_num_seqs - len(self.running), 0)]
    if candidates and step.budget > 0:
        self.kv.prepare_admissions(candidates, step.budget)  # a hint: one round trip in the pipeline
    why = None  # why the first one left in line waits
    for request in candidates:
        if step.budget == 0:
            break
        hit_blocks, num_hit = self.kv.get_computed_blocks(request)
        num_new = min(request.num_tokens - num_hit, step.budget)  # chunked prefill: what the budget allows
        if self.kv.allocate_slots(request, num_new, hit_blocks, num_hit) is None:
            why = NO_FREE_BLOCKS
            break  # nobody overtakes the first that does not fit
        request.num_computed_tokens = num_hit
        if request.num_cached_tokens is None:
            request.num_cached_tokens = num_hit
        step.admit(request, num_new, num_hit)
    for request in step.admitted:  # the first in line, in order
        self.waiting.remove(request)
        request.status = RequestStatus.RUNNING
        self.running.append(request)
    if why is None:
        why = "token budget used up" if step.budget == 0 else f"max_num_seqs={self.max_num_seqs} running"
    step.note_waiting_queue(self.waiting, why)


class ReferenceScheduler(SchedulerSkeleton):
    """The skeleton filled with the answers above: it decides exactly as modkit's ``Scheduler``."""

    def schedule_running(self, step: StepDraft) -> None:
        schedule_running(self, step)

    def allocate_or_preempt(self, request: Request, num_new: int, step: StepDraft) -> bool:
        return allocate_or_preempt(self, request, num_new, step)

    def schedule_waiting(self, step: StepDraft) -> None:
        schedule_waiting(self, step)


# -- the eviction policy: least recently freed first (vLLM's LRU) --------------------------------


def add(self: EvictionSkeleton, block: KVCacheBlock) -> None:
    self.free[block.block_id] = block  # a dict keeps insertion order: the newest free block is last


def remove(self: EvictionSkeleton, block: KVCacheBlock) -> None:
    del self.free[block.block_id]


def pop(self: EvictionSkeleton) -> KVCacheBlock:
    if not self.free:
        raise IndexError("no free blocks")
    oldest = next(iter(self.free))
    return self.free.pop(oldest)


def iterate(self: EvictionSkeleton) -> Iterator[KVCacheBlock]:
    return iter(list(self.free.values()))


class ReferenceLRU(EvictionSkeleton):
    """The eviction skeleton filled with the answers above: the order of modkit's ``LRUEviction``."""

    def add(self, block: KVCacheBlock) -> None:
        add(self, block)

    def remove(self, block: KVCacheBlock) -> None:
        remove(self, block)

    def pop(self) -> KVCacheBlock:
        return pop(self)

    def __iter__(self) -> Iterator[KVCacheBlock]:
        return iterate(self)
