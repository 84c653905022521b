"""The step ``Scheduler.schedule()`` is planning: what each request gets, and why the others wait;
and, once planned, whether a step that computes nothing leaves a request waiting for ever."""

from __future__ import annotations

from dataclasses import dataclass, field

from modkit.request import Request
from modkit.scheduler.interface import SchedulerInterface
from modkit.scheduler.output import MAX_WAITING_REASONS, ScheduledEntry, SchedulerOutput


@dataclass(slots=True)
class StepDraft:
    """The step being planned: what each request gets, and why the others wait."""

    budget: int  # tokens left to hand out
    scheduled: dict[str, int] = field(default_factory=dict)  # req_id -> tokens, in batch order
    entries: list[ScheduledEntry] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)  # from the waiting queue
    preempted: dict[str, str] = field(default_factory=dict)  # req_id -> why
    waiting_why: dict[str, str] = field(default_factory=dict)  # the first MAX_WAITING_REASONS only
    prefix_cache_queries: int = 0  # tokens of the admitted requests
    prefix_cache_hits: int = 0  # of those, found in the prefix cache
    num_out_of_budget: int = 0  # running requests not served: the budget was used up

    def schedule(self, request: Request, num_tokens: int, kind: str, num_cached_tokens: int = 0) -> None:
        self.scheduled[request.req_id] = num_tokens
        self.entries.append(
            ScheduledEntry(request.req_id, num_tokens, kind, request.num_computed_tokens, num_cached_tokens)
        )
        self.budget -= num_tokens

    def admit(self, request: Request, num_tokens: int, num_hit: int) -> None:
        self.schedule(request, num_tokens, "prompt", num_hit)
        self.admitted.append(request)
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_hit

    def unschedule(self, request: Request) -> None:
        """Take back what ``request`` got in this step (it is being preempted)."""
        num_tokens = self.scheduled.pop(request.req_id, None)
        if num_tokens is not None:
            self.budget += num_tokens
            self.entries = [e for e in self.entries if e.req_id != request.req_id]

    def note_out_of_budget(self, request: Request) -> None:
        """A running request the budget ran out before (the first MAX_WAITING_REASONS are named)."""
        self.num_out_of_budget += 1
        if self.num_out_of_budget <= MAX_WAITING_REASONS:
            self.waiting_why[request.req_id] = "token budget used up by earlier running requests"

    def note_waiting_queue(self, waiting: list[Request], why: str) -> None:
        """The first in line waits for ``why``; the next few are queued behind it."""
        if waiting:
            self.waiting_why[waiting[0].req_id] = why
            for later in waiting[1:MAX_WAITING_REASONS]:
                self.waiting_why.setdefault(later.req_id, f"queued behind {waiting[0].req_id}")


def waits_for_ever(scheduler: SchedulerInterface, plan: SchedulerOutput) -> Request | None:
    """The request that ``plan`` shows can never be scheduled, or None.

    A plan that computes nothing and leaves nothing running was made with the whole KV pool
    within reach (only running requests hold blocks). A request waits then only if it needs
    more than the whole pool, in one of two ways: nothing was preempted, and the first waiting
    request did not fit; or the last request running preempted itself (the last one the step
    preempted), finding no room to grow even alone (a prefix-cache hit can let such a request
    in; its own growth takes it out again, step after step). No free, new request or abort can
    make room for it: stepping on would repeat the same steps for ever, so the caller fails it.
    A ``max_model_len`` within what the KV cache holds (``fit_max_model_len``) rules this out;
    this is the guard behind it.
    """
    if plan.total_num_scheduled_tokens or scheduler.running or not scheduler.waiting:
        return None
    if not plan.preempted_req_ids:
        return scheduler.waiting[0]
    record = scheduler.last_record
    last_preempted = list(record.preempted)[-1] if record is not None and record.preempted else None
    return scheduler.requests.get(last_preempted) if last_preempted is not None else None


def never_fits_message(request: Request, scheduler: SchedulerInterface) -> str:
    """Why ``waits_for_ever`` fails ``request``, for its client."""
    return (
        f"request {request.req_id} ({request.num_tokens} tokens) does not fit in the whole KV cache "
        f"(blocks of {scheduler.kv.block_size} tokens), even with no other request running: "
        f"max_model_len ({scheduler.max_model_len}) is larger than the cache holds"
    )
