"""Skeletons to fill in: a scheduler whose ``schedule()`` is cut into the phases you write, and an eviction policy.

``SchedulerSkeleton`` is modkit's ``Scheduler`` (``modkit/scheduler/scheduler.py``) with the
decisions taken out. Its ``schedule()`` keeps the frame (one ``StepDraft`` per step, the output
diff, advancing ``num_computed_tokens``, the step record) and calls, in order::

    schedule_running(step)                       1. running requests first, each capped by the budget
        allocate_or_preempt(request, n, step)       blocks for n more tokens, or preempt the policy's victim
    schedule_waiting(step)                       2. then waiting requests, while budget, seats and blocks last

which a subclass writes. Everything else (``add_request``, ``update_from_output``, finishing,
``check_invariants``) is the real scheduler's, so a subclass that decides as modkit does is
modkit's scheduler, and can replace it in a running pipeline (``Pipeline.swap("scheduler", cls)``).
``modkit.lessons.compare_schedulers`` tells you whether it decides as modkit does, step by step.

``EvictionSkeleton`` is an ``EvictionPolicy`` with a dict to keep the free blocks in; a
subclass writes ``add``, ``remove``, ``pop`` and ``__iter__`` (see ``modkit/kvcache/eviction.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

from modkit.kvcache.block_pool import KVCacheBlock
from modkit.kvcache.eviction import EvictionPolicy
from modkit.request import Request
from modkit.scheduler.output import SchedulerOutput
from modkit.scheduler.scheduler import Scheduler
from modkit.scheduler.step import StepDraft

WRITE_ME = (
    "write {name} in your subclass (the notebook's skeleton cell says how; modkit.lessons.solutions has one answer)"
)


class SchedulerSkeleton(Scheduler):
    """modkit's ``Scheduler`` with the three decisions of a step left to a subclass.

    What a subclass has to work with (all of it the real scheduler's state):

    - ``self.running``, ``self.waiting``: lists of ``Request``; ``waiting`` is already in the
      policy's admission order; ``self.max_num_seqs``: at most this many run at once;
    - ``self.kv``: the KV cache manager (``get_computed_blocks``, ``allocate_slots``, ``prepare_admissions``);
    - ``self.policy.pick_victim(self.running)``: whom to preempt when a block is needed;
    - ``step`` (a ``StepDraft``): ``budget`` (tokens left in this step), ``schedule``,
      ``admit``, ``unschedule``, ``preempted`` (req_id -> why), ``admitted``;
    - the helpers below: ``tokens_to_compute``, ``last_token_in_flight``, ``is_decode``, ``preempt``.
    """

    def schedule(self) -> SchedulerOutput:
        """One step: running requests first, then waiting ones; the rest is the real scheduler's frame."""
        if self.policy.reorders_over_time:
            self.waiting.sort(key=self.policy.admission_key)
        step = StepDraft(budget=self.max_num_batched_tokens)
        self.schedule_running(step)
        self.schedule_waiting(step)
        output = self._make_output(step.scheduled, step.admitted, step.preempted)
        self._advance(step.scheduled)  # num_computed_tokens moves on before the model runs
        self._record(step)
        return output

    # -- the three you write ---------------------------------------------------------------

    def schedule_running(self, step: StepDraft) -> None:
        """1. Each running request in order gets what it has left to compute, capped by ``step.budget``."""
        raise NotImplementedError(WRITE_ME.format(name="schedule_running"))

    def allocate_or_preempt(self, request: Request, num_new: int, step: StepDraft) -> bool:
        """Blocks for ``num_new`` more tokens of a running ``request``, preempting the policy's victims
        until they fit; False if ``request`` itself had to go."""
        raise NotImplementedError(WRITE_ME.format(name="allocate_or_preempt"))

    def schedule_waiting(self, step: StepDraft) -> None:
        """2. Waiting requests in order, each with its prefix-cache hit skipped, while budget, seats and blocks last."""
        raise NotImplementedError(WRITE_ME.format(name="schedule_waiting"))

    # -- given ------------------------------------------------------------------------------

    def tokens_to_compute(self, request: Request) -> int:
        """Tokens of ``request`` not computed yet: its prompt and outputs, plus a token still being
        sampled (async scheduling: the worker fills that one in), minus ``num_computed_tokens``."""
        return request.num_tokens + request.num_output_placeholders - request.num_computed_tokens

    def last_token_in_flight(self, request: Request) -> bool:
        """The request's last token (``max_tokens``, or the model's length) is being sampled now:
        scheduling it again would compute past its end. Only ever true under async scheduling."""
        return self._last_token_in_flight(request)

    def is_decode(self, request: Request) -> bool:
        """Whether what ``request`` computes this step is one new output token (else a prompt chunk,
        or a recompute after a preemption). Only the step record cares."""
        known = request.num_tokens + request.num_output_placeholders
        return request.num_computed_tokens == known - 1 >= request.num_prompt_tokens

    def preempt(self, request: Request) -> None:
        """Take ``request``'s blocks away: it leaves ``running``, its ``num_computed_tokens`` drops to 0,
        and it goes back to ``waiting`` (in the policy's order) to be recomputed later."""
        self._preempt(request)


class EvictionSkeleton(EvictionPolicy):
    """An eviction policy to write: an order over the free blocks, next to go first.

    ``self.free`` maps block id -> block and, being a dict, keeps the order blocks were put in:
    use it (an LRU needs nothing else) or keep your own structure. The pool calls ``add`` when
    a block becomes free, ``remove`` when a prefix hit takes a free cached block back, and
    ``pop`` when an allocation needs a block (the one it returns loses its cached content).
    """

    def __init__(self) -> None:
        self.free: dict[int, KVCacheBlock] = {}

    def add(self, block: KVCacheBlock) -> None:
        raise NotImplementedError(WRITE_ME.format(name="add"))

    def remove(self, block: KVCacheBlock) -> None:
        raise NotImplementedError(WRITE_ME.format(name="remove"))

    def pop(self) -> KVCacheBlock:
        raise NotImplementedError(WRITE_ME.format(name="pop"))

    def __iter__(self) -> Iterator[KVCacheBlock]:
        raise NotImplementedError(WRITE_ME.format(name="__iter__"))
