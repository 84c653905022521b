"""Stepping a scheduler without a model: what ``modkit.lessons`` compares, and what a whole-scheduler swap tries.

No forward runs. Each step the scheduler plans exactly as it would for a worker, and every
request the plan brings to the end of its known tokens gets ``next_token(req_id, position)``
instead of a sampled token: a token that depends only on the request and its output
position, so two schedulers fed the same requests see the same token streams however
differently they batch them. The scheduler objects, their KV cache managers and their
``update_from_output`` are the real ones; only the model is missing::

    plan = scheduler.schedule()                    as in the scheduler process
    (async scheduling: plan the next step now, before this one's tokens are back)
    scheduler.update_from_output(plan, tokens)     tokens from next_token(), for the requests that sample

With ``async_scheduling`` (the pipeline's default) the loop is the scheduler process's: a step
is planned while the one before is still "on the worker", so the scheduler counts its
in-flight tokens as placeholders, exactly as it must when it serves.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from modkit.kvcache.manager import KVCacheManager
from modkit.request import Request
from modkit.sampling_params import SamplingParams
from modkit.scheduler.output import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from modkit.scheduler.scheduler import Scheduler

NextToken = Callable[[str, int], int]  # (req_id, output position) -> the token it "samples" there


def default_next_token(req_id: str, position: int) -> int:
    """A token that depends only on the request and the output position (so both sides of a comparison agree)."""
    return (sum(map(ord, req_id)) * 7919 + position * 104_729) % 30_000 + 1


@dataclass(slots=True)
class PlannedStep:
    """A step planned and not yet "back from the worker"."""

    plan: SchedulerOutput
    sampling: list[str]  # the requests that sample a token in this step, in batch order
    planned_ahead: bool  # planned while the step before was still in flight


class SimulatedWorker:
    """Drives one scheduler as the scheduler process does, with ``next_token`` standing in for the model."""

    def __init__(self, scheduler: Scheduler, async_scheduling: bool = True, next_token: NextToken = default_next_token):
        self.scheduler = scheduler
        self.async_scheduling = async_scheduling
        self.next_token = next_token
        self.in_flight: deque[PlannedStep] = deque()  # oldest first

    @property
    def busy(self) -> bool:
        """Requests unfinished, or a step still in flight."""
        return bool(self.in_flight) or self.scheduler.has_unfinished_requests()

    def may_plan_ahead(self) -> bool:
        """What the scheduler process checks before planning step N+1 while step N runs."""
        return self.async_scheduling and len(self.in_flight) == 1 and self.scheduler.can_plan_ahead()

    def plan(self) -> PlannedStep:
        """``schedule()`` once; the step goes in flight."""
        scheduler = self.scheduler
        placeholders = {r.req_id: r.num_output_placeholders for r in scheduler.running}
        plan = scheduler.schedule()
        # A request that reached the end of its known tokens samples one: the scheduler counts
        # it as a placeholder until the step is back (Scheduler._advance).
        sampling = [
            req_id
            for req_id in plan.num_scheduled_tokens
            if req_id in scheduler.requests
            and scheduler.requests[req_id].num_output_placeholders > placeholders.get(req_id, 0)
        ]
        step = PlannedStep(plan, sampling, planned_ahead=bool(self.in_flight))
        self.in_flight.append(step)
        return step

    def finish_oldest(self) -> list[EngineCoreOutput]:
        """The oldest step comes back: each request that sampled gets its next token."""
        step = self.in_flight.popleft()
        requests = self.scheduler.requests
        # A request finished or moved since the step was planned samples nothing; one preempted
        # since still gets its token (it was computed over its own blocks), as in the pipeline.
        sampled = [r for r in step.sampling if r in requests]
        tokens = [self.next_token(r, requests[r].num_output_tokens) for r in sampled]
        return self.scheduler.update_from_output(step.plan, ModelRunnerOutput(sampled, tokens))


def check_plan(scheduler: Scheduler, plan: SchedulerOutput) -> list[str]:
    """What ``schedule()`` promises the worker (``scheduler.interface``), checked on ``plan`` just made:
    one line per broken promise, none if it keeps them all."""
    problems = []
    counts = plan.num_scheduled_tokens
    if plan.total_num_scheduled_tokens != sum(counts.values()):
        problems.append(
            f"total_num_scheduled_tokens={plan.total_num_scheduled_tokens}, the counts add up to {sum(counts.values())}"
        )
    if sum(counts.values()) > scheduler.max_num_batched_tokens:
        problems.append(
            f"{sum(counts.values())} tokens scheduled, over the budget of {scheduler.max_num_batched_tokens}"
        )
    for req_id, n in counts.items():
        request = scheduler.requests.get(req_id)
        if n < 1:
            problems.append(f"{req_id} is scheduled for {n} tokens (at least 1)")
        if request is None:
            problems.append(f"{req_id} is scheduled but is not a live request")
            continue
        slots = len(scheduler.kv.get_block_ids(req_id)) * scheduler.kv.block_size
        if slots < request.num_computed_tokens:
            problems.append(f"{req_id} computes up to token {request.num_computed_tokens} but its blocks hold {slots}")
    if len(scheduler.running) > scheduler.max_num_seqs:
        problems.append(f"{len(scheduler.running)} requests running, over max_num_seqs={scheduler.max_num_seqs}")
    return problems


def try_scheduler(
    cls: type[Scheduler],
    max_num_batched_tokens: int,
    max_num_seqs: int,
    max_model_len: int,
    block_size: int = 16,
    max_steps: int = 10_000,
) -> int:
    """The trial of a whole scheduler class before it serves: raises if it fails; returns the steps it took.

    A fresh ``cls`` gets its own small KV cache manager and a few requests chosen to reach
    every path (a prompt longer than the budget, short ones, a pool too small for all of them
    at once, so something is preempted), and is stepped with async scheduling. After every
    ``schedule()`` and ``update_from_output()`` its invariants must hold and its plans keep
    their promises; every request must finish within ``max_steps``.
    """
    longest = max(2, min(max_model_len - 4, max_num_batched_tokens + 3))
    lengths = [longest, 3, 2 * block_size + 1, block_size, 7]
    num_blocks = -(-(longest + 4) // block_size) + 3  # room for the longest, not for all at once
    scheduler = cls(KVCacheManager(num_blocks, block_size), max_num_batched_tokens, max_num_seqs, max_model_len)
    for i, n in enumerate(lengths):
        prompt = [(7 * i + j) % 1000 + 1 for j in range(n)]
        scheduler.add_request(Request(f"trial-{i}", prompt, SamplingParams(max_tokens=3), arrival_time=float(i)))
    worker = SimulatedWorker(scheduler, async_scheduling=True)
    num_steps = 0
    while worker.busy:
        if num_steps >= max_steps:
            raise RuntimeError(
                f"{cls.__name__}: {len(scheduler.requests)} trial requests unfinished after {max_steps} steps"
            )
        if not worker.in_flight:
            _plan_checked(worker, cls)
            num_steps += 1
        if worker.may_plan_ahead():
            _plan_checked(worker, cls)
            num_steps += 1
        worker.finish_oldest()
        scheduler.check_invariants()
    return num_steps


def _plan_checked(worker: SimulatedWorker, cls: type[Scheduler]) -> None:
    step = worker.plan()
    worker.scheduler.check_invariants()
    problems = check_plan(worker.scheduler, step.plan)
    if problems:
        raise ValueError(f"{cls.__name__}, trial step {step.plan.step}: " + "; ".join(problems))
    scheduler = worker.scheduler
    if (
        not step.plan.num_scheduled_tokens
        and scheduler.waiting
        and not scheduler.running
        and len(worker.in_flight) == 1
    ):
        raise RuntimeError(f"{cls.__name__}, trial step {step.plan.step}: nothing running, and nothing admitted")
