"""Run your scheduler (or eviction policy) and modkit's on one workload, step by step: the first step they differ.

A simulation, with the real objects: each side is a real scheduler (yours, a subclass of
modkit's ``Scheduler``, or modkit's own) over its own real ``KVCacheManager``; only the model
is missing. Every request that reaches the end of its known tokens "samples" a token that
depends only on its id and position (``modkit.scheduler.simulate``), so both sides see the
same tokens; each request generates exactly its ``max_tokens``. With ``async_scheduling``
(the pipeline's default) the next step is planned before the last one's tokens are back, as
the scheduler process does::

    each side, each step:  the requests arriving now join its waiting queue
                           schedule()            -> Decision: tokens per request, preempted,
                           its tokens come back              block tables, prefix hits
    then, step by step:    decisions equal?  no  -> Difference: both decisions, the queues and
                                                    free blocks each faced, and why

The two sides never share anything, so running one after the other and lining their steps
up is the same as running them in lockstep; the candidate is also held to the promises a
scheduler makes (``check_plan``) and to its invariants after every call.

``compare_schedulers`` puts your scheduler against modkit's; ``compare_eviction`` runs modkit's
scheduler on both sides, over your eviction policy and over LRU.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from modkit.kvcache.eviction import EvictionPolicy
from modkit.kvcache.manager import KVCacheManager
from modkit.lessons.workload import Workload, WorkloadRequest, synthetic_workload
from modkit.request import Request
from modkit.sampling_params import SamplingParams
from modkit.scheduler.scheduler import Scheduler
from modkit.scheduler.simulate import NextToken, SimulatedWorker, check_plan, default_next_token

if TYPE_CHECKING:
    import pandas as pd

NUM_NEXT_FREE = 8  # free blocks shown, next to go first


@dataclass(frozen=True, slots=True)
class Decision:
    """What one scheduler decided in one step: what its worker would be told."""

    step: int
    num_scheduled_tokens: dict[str, int]  # req_id -> tokens, in batch order
    preempted: tuple[str, ...]  # sorted
    block_tables: dict[str, tuple[int, ...]]  # each scheduled request's whole block table after the step
    prefix_hits: dict[str, int]  # tokens found in the prefix cache, of the requests admitted this step
    token_budget: int
    planned_ahead: bool  # planned while the step before was still in flight (async scheduling)
    num_running: int = 0  # after the step was planned
    num_waiting: int = 0
    why: dict[str, str] = field(default_factory=dict)  # the scheduler's own reasons: who waits, who was preempted
    problems: tuple[str, ...] = ()  # promises or invariants it broke (never the reference's)
    error: str | None = None  # what schedule() raised, if it did

    @property
    def total(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def budget_left(self) -> int:
        return self.token_budget - self.total

    def same_as(self, other: Decision) -> bool:
        """The same tokens per request, preemptions, block tables and prefix hits (batch order aside)."""
        return (
            self.num_scheduled_tokens == other.num_scheduled_tokens
            and self.preempted == other.preempted
            and self.block_tables == other.block_tables
            and self.prefix_hits == other.prefix_hits
            and self.planned_ahead == other.planned_ahead
            and self.error is None
            and other.error is None
        )


@dataclass(frozen=True, slots=True)
class QueueState:
    """What a scheduler faced just before it planned a step."""

    waiting: tuple[tuple[str, int], ...]  # (req_id, num_tokens), in admission order
    running: tuple[tuple[str, int, int, int], ...]  # (req_id, num_computed_tokens, tokens known, of those in flight)
    num_free_blocks: int
    next_free_blocks: tuple[int, ...]  # the first NUM_NEXT_FREE the eviction policy would hand out
    token_budget: int


@dataclass(frozen=True, slots=True)
class Difference:
    """The first step two schedulers decided differently, both decisions, and what they faced."""

    step: int
    reference: Decision
    candidate: Decision
    reference_state: QueueState
    candidate_state: QueueState
    reasons: tuple[str, ...]  # one readable line per difference found


@dataclass(slots=True)
class Comparison:
    """The result of a lockstep run: ``matched``, the ``first_difference``, and per-step totals."""

    reference_name: str
    candidate_name: str
    workload: Workload
    num_steps: int  # steps compared
    first_difference: Difference | None
    num_differing_steps: int
    steps: pd.DataFrame  # step, tokens, running, waiting and preempted of each side, same
    summary: dict[str, Any]  # per side: steps to finish, preemptions, prefix-hit tokens, evictions
    kind: str = "scheduler"  # or "eviction policy"
    candidate_stopped: str | None = None  # why the candidate's run ended early (it raised, say)

    @property
    def matched(self) -> bool:
        """Identical decisions at every step, and both sides finished every request together."""
        return self.first_difference is None

    def __str__(self) -> str:
        from modkit.lessons.report import comparison_text

        return comparison_text(self)

    def __repr__(self) -> str:
        return str(self).splitlines()[0]

    def _repr_html_(self) -> str:
        from modkit.lessons.report import comparison_html

        return comparison_html(self)


@dataclass(slots=True)
class _Side:
    name: str
    worker: SimulatedWorker
    kv: KVCacheManager
    checked: bool  # the candidate: also held to the scheduler's promises and invariants

    @property
    def scheduler(self) -> Scheduler:
        return self.worker.scheduler


@dataclass(slots=True)
class _Run:
    """One side's run: what it faced and decided at each step, and why it stopped early, if it did."""

    states: list[QueueState] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    stopped: str | None = None


def compare_schedulers(
    candidate: type[Scheduler],
    reference: type[Scheduler] | None = None,
    workload: Workload | None = None,
    *,
    policy: str = "fcfs",
    async_scheduling: bool = True,
    next_token: NextToken = default_next_token,
    max_steps: int = 5_000,
) -> Comparison:
    """Run ``candidate`` (a ``Scheduler`` subclass, e.g. a filled-in ``SchedulerSkeleton``) and
    ``reference`` (modkit's ``Scheduler``) on ``workload`` (default: a small synthetic one), each
    over its own LRU ``KVCacheManager``, and compare their decisions step by step. A simulation
    without a model (see the module docstring); the schedulers are the real objects.
    """
    workload = workload or synthetic_workload()
    names = _distinct((reference or Scheduler).__name__, candidate.__name__)

    def side(cls: type[Scheduler], name: str, checked: bool) -> _Side:
        kv = KVCacheManager(workload.num_blocks, workload.block_size)
        scheduler = cls(kv, workload.max_num_batched_tokens, workload.max_num_seqs, workload.max_model_len, policy)
        return _Side(name, SimulatedWorker(scheduler, async_scheduling, next_token), kv, checked)

    sides = (side(reference or Scheduler, names[0], False), side(candidate, names[1], True))
    return _compare(sides, workload, max_steps, "scheduler")


def compare_eviction(
    candidate: type[EvictionPolicy],
    reference: str | type[EvictionPolicy] = "lru",
    workload: Workload | None = None,
    *,
    async_scheduling: bool = True,
    next_token: NextToken = default_next_token,
    max_steps: int = 5_000,
) -> Comparison:
    """modkit's ``Scheduler`` on both sides, over a ``KVCacheManager`` whose eviction policy is
    ``candidate`` on one and ``reference`` (LRU) on the other. Which free block each allocation
    takes shows in the block tables, and which cached prefixes survive in the prefix hits."""
    workload = workload or synthetic_workload()
    names = _distinct(reference if isinstance(reference, str) else reference.__name__, candidate.__name__)

    def side(policy: str | type[EvictionPolicy], name: str, checked: bool) -> _Side:
        kv = KVCacheManager(workload.num_blocks, workload.block_size, eviction_policy=policy)
        scheduler = Scheduler(kv, workload.max_num_batched_tokens, workload.max_num_seqs, workload.max_model_len)
        return _Side(name, SimulatedWorker(scheduler, async_scheduling, next_token), kv, checked)

    sides = (side(reference, names[0], False), side(candidate, names[1], True))
    return _compare(sides, workload, max_steps, "eviction policy")


def _distinct(reference: str, candidate: str) -> tuple[str, str]:
    return (reference, candidate) if reference != candidate else (f"{reference} (reference)", candidate)


def _compare(sides: tuple[_Side, _Side], workload: Workload, max_steps: int, kind: str) -> Comparison:
    import pandas as pd

    runs = [_run(side, workload, max_steps) for side in sides]
    reference, candidate = runs
    if reference.stopped is not None:
        raise RuntimeError(f"the reference {sides[0].name} stopped: {reference.stopped}")
    rows, first, num_differing = [], None, 0
    for i in range(max(len(reference.decisions), len(candidate.decisions))):
        ref = reference.decisions[i] if i < len(reference.decisions) else None
        cand = candidate.decisions[i] if i < len(candidate.decisions) else None
        same = ref is not None and cand is not None and ref.same_as(cand) and not cand.problems
        rows.append(_row(i, ref, cand, same))
        if same:
            continue
        num_differing += 1
        if first is None:
            first = _difference(i, sides, runs)
    if first is None and candidate.stopped is not None:  # e.g. it raised in update_from_output after its last plan
        first = _difference(len(candidate.decisions) - 1, sides, runs)
    summary: dict[str, Any] = {"num_requests": len(workload.requests), "num_steps": len(rows)}
    for side in sides:
        summary[side.name] = {
            "steps": side.scheduler.step_count,
            "unfinished": len(side.scheduler.requests),
            "preemptions": side.scheduler.num_preemptions,
            "prefix_hit_tokens": side.kv.prefix_cache_hits,
            "evictions": side.kv.pool.num_evictions,
        }
    steps = pd.DataFrame(rows)
    return Comparison(
        sides[0].name, sides[1].name, workload, len(rows), first, num_differing, steps, summary, kind, candidate.stopped
    )


def _run(side: _Side, workload: Workload, max_steps: int) -> _Run:
    """Step one side until every request finished, as the scheduler process would; record each step."""
    run, worker, scheduler = _Run(), side.worker, side.scheduler
    queue = sorted(enumerate(workload.requests), key=lambda item: (item[1].arrival_step, item[0]))
    order = 0
    while queue or worker.busy:
        for ahead in (False, True):
            if ahead and not worker.may_plan_ahead():
                continue
            if not ahead and (worker.in_flight or not (queue or scheduler.has_unfinished_requests())):
                continue
            if scheduler.step_count >= max_steps:
                run.stopped = f"{len(scheduler.requests)} requests unfinished after {max_steps} steps"
                return run
            while queue and queue[0][1].arrival_step <= scheduler.step_count:
                _arrive(scheduler, queue.pop(0)[1], order)
                order += 1
            run.states.append(_state(side))
            run.decisions.append(_plan(side))
            if run.decisions[-1].error is not None:
                run.stopped = f"schedule() raised {run.decisions[-1].error}"
                return run
        if worker.in_flight:
            problems = _finish_step(side)
            if problems:
                last = run.decisions[-1]
                run.decisions[-1] = replace(last, problems=last.problems + problems)
                run.stopped = "; ".join(problems)
                return run
    return run


def _arrive(scheduler: Scheduler, request: WorkloadRequest, order: int) -> None:
    # arrival_time orders FCFS: the arrival step, then the position in the workload.
    params = SamplingParams(temperature=0, max_tokens=request.max_tokens)
    scheduler.add_request(Request(request.req_id, list(request.prompt_token_ids), params, arrival_time=float(order)))


def _state(side: _Side) -> QueueState:
    scheduler = side.scheduler
    free: list[int] = []
    for block in side.kv.pool.eviction:
        if len(free) == NUM_NEXT_FREE:
            break
        free.append(block.block_id)
    return QueueState(
        waiting=tuple((r.req_id, r.num_tokens) for r in scheduler.waiting),
        running=tuple(
            (r.req_id, r.num_computed_tokens, r.num_tokens + r.num_output_placeholders, r.num_output_placeholders)
            for r in scheduler.running
        ),
        num_free_blocks=side.kv.num_free_blocks,
        next_free_blocks=tuple(free),
        token_budget=scheduler.max_num_batched_tokens,
    )


def _plan(side: _Side) -> Decision:
    """``schedule()`` once; the candidate (``side.checked``) is also held to the scheduler's promises."""
    scheduler = side.scheduler
    step, planned_ahead, budget = scheduler.step_count, bool(side.worker.in_flight), scheduler.max_num_batched_tokens
    try:
        plan = side.worker.plan().plan
    except Exception as error:
        if not side.checked:
            raise
        return Decision(step, {}, (), {}, {}, budget, planned_ahead, error=_describe(error))
    problems = check_plan(scheduler, plan) + _invariants(scheduler) if side.checked else []
    record = scheduler.last_record
    why = {**record.waiting, **record.preempted} if record is not None and record.step == step else {}
    return Decision(
        step=step,
        num_scheduled_tokens=dict(plan.num_scheduled_tokens),
        preempted=tuple(sorted(plan.preempted_req_ids)),
        block_tables={r: tuple(side.kv.get_block_ids(r)) for r in plan.num_scheduled_tokens},
        prefix_hits={new.req_id: new.num_computed_tokens for new in plan.scheduled_new_reqs},
        token_budget=budget,
        planned_ahead=planned_ahead,
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        why=why,
        problems=tuple(problems),
    )


def _finish_step(side: _Side) -> tuple[str, ...]:
    """The oldest step's tokens come back; for the candidate, what broke (``update_from_output``, invariants)."""
    try:
        side.worker.finish_oldest()
    except Exception as error:
        if not side.checked:
            raise
        return (f"update_from_output raised {_describe(error)}",)
    return tuple(_invariants(side.scheduler)) if side.checked else ()


def _invariants(scheduler: Scheduler) -> list[str]:
    try:
        scheduler.check_invariants()
    except AssertionError as error:
        return [f"invariant broken: {error or 'check_invariants() failed'}"]
    except Exception as error:
        return [f"check_invariants() raised {_describe(error)}"]
    return []


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _row(step: int, reference: Decision | None, candidate: Decision | None, same: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"step": step}
    for label, d in (("reference", reference), ("candidate", candidate)):
        row[f"{label}_tokens"] = d.total if d else None
        row[f"{label}_seqs"] = len(d.num_scheduled_tokens) if d else None
        row[f"{label}_preempted"] = len(d.preempted) if d else None
        row[f"{label}_running"] = d.num_running if d else None
        row[f"{label}_waiting"] = d.num_waiting if d else None
    either = reference or candidate
    row["token_budget"] = either.token_budget if either is not None else None
    row["same"] = same
    return row


def _difference(i: int, sides: tuple[_Side, _Side], runs: list[_Run]) -> Difference:
    """The difference at step ``i``: both decisions (an empty one for a side that planned no step ``i``) and why."""
    from modkit.lessons.report import explain

    decisions, states = [], []
    for side, run in zip(sides, runs, strict=True):
        if i < len(run.decisions):
            decisions.append(run.decisions[i])
            states.append(run.states[i])
        else:
            budget = side.scheduler.max_num_batched_tokens
            decisions.append(Decision(i, {}, (), {}, {}, budget, False))
            states.append(_state(side))
    lengths = [len(run.decisions) for run in runs]
    ref, cand = decisions
    reasons = explain(sides[0].name, sides[1].name, ref, cand, states[0], states[1], lengths, runs[1].stopped)
    return Difference(i, decisions[0], decisions[1], states[0], states[1], reasons)
