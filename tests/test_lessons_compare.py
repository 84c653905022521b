"""modkit.lessons: the reference answers decide as modkit's scheduler and LRU do, wrong ones are caught at
the step where they first matter, the simulation makes the in-process engine's decisions, and a whole
scheduler class sent by value serves a pipeline (and is taken over from if it fails).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_pipeline import free_ports
from waiting import wait_until

from modkit import LLM, Pipeline, SamplingParams
from modkit.kvcache import KVCacheBlock, KVCacheManager, LFUEviction
from modkit.lessons import (
    SchedulerSkeleton,
    Workload,
    compare_eviction,
    compare_schedulers,
    synthetic_workload,
    workload_from_trace,
)
from modkit.lessons.solutions import ReferenceLRU, ReferenceScheduler
from modkit.request import Request
from modkit.scheduler import Scheduler
from modkit.scheduler.simulate import SimulatedWorker, try_scheduler
from modkit.scheduler.step import StepDraft
from modkit.trace import Trace
from modkit.transport import RemoteError

TIGHT = synthetic_workload(num_requests=12, num_blocks=16)  # preempts, hits cached prefixes
SAVED_TRACE = Path(__file__).parent / "data" / "trace_2workers.json.gz"


class NoChunking(ReferenceScheduler):
    """Admits waiting requests as if the token budget had no end."""

    def schedule_waiting(self, step: StepDraft) -> None:
        step.budget = 10**9
        super().schedule_waiting(step)


class EarliestVictim(ReferenceScheduler):
    """Preempts the earliest arrival instead of the latest."""

    def allocate_or_preempt(self, request: Request, num_new: int, step: StepDraft) -> bool:
        while self.kv.allocate_slots(request, num_new) is None:
            victim = min(self.running, key=lambda r: r.arrival_time)
            step.unschedule(victim)
            self.preempt(victim)
            step.preempted[victim.req_id] = "earliest"
            if victim is request:
                return False
        return True


class LeftWaiting(ReferenceScheduler):
    """Admits, but leaves the admitted requests in the waiting queue too."""

    def schedule_waiting(self, step: StepDraft) -> None:
        super().schedule_waiting(step)
        self.waiting.extend(step.admitted)


class MostRecentlyFreed(ReferenceLRU):
    def pop(self) -> KVCacheBlock:
        return self.free.popitem()[1]

    def __iter__(self) -> Iterator[KVCacheBlock]:
        return iter(list(reversed(self.free.values())))


def test_the_reference_answers_decide_as_modkits_scheduler_and_lru() -> None:
    for workload in (synthetic_workload(), TIGHT, synthetic_workload(seed=3, num_blocks=24, max_num_seqs=3)):
        for async_scheduling in (True, False):
            result = compare_schedulers(ReferenceScheduler, workload=workload, async_scheduling=async_scheduling)
            assert result.matched, str(result)
            assert result.summary["Scheduler"] == result.summary["ReferenceScheduler"]
            assert result.summary["ReferenceScheduler"]["unfinished"] == 0
    tight = compare_schedulers(ReferenceScheduler, workload=TIGHT).summary["Scheduler"]
    assert tight["preemptions"] > 0 and tight["prefix_hit_tokens"] > 0, "the tight workload takes those paths"
    eviction = compare_eviction(ReferenceLRU, workload=TIGHT)
    assert eviction.matched, str(eviction)
    assert eviction.summary["lru"] == eviction.summary["ReferenceLRU"] and eviction.summary["lru"]["evictions"] > 0


def test_forgetting_the_budget_is_caught_at_the_step_worked_out_by_hand() -> None:
    # A: 20-token prompt at step 0, decodes at 1; B (100 tokens) arrives at step 2: A decodes
    # first (1 token), B gets the 63 left of a 64-token budget. Without the budget, B gets 100.
    by_hand = Workload.of([("A", 0, 20, 8), ("B", 2, 100, 4)], num_blocks=32, max_num_batched_tokens=64)
    for async_scheduling in (True, False):
        result = compare_schedulers(NoChunking, workload=by_hand, async_scheduling=async_scheduling)
        d = result.first_difference
        assert not result.matched and d is not None and d.step == 2
        assert d.reference.num_scheduled_tokens == {"A": 1, "B": 63}
        assert d.candidate.num_scheduled_tokens == {"A": 1, "B": 100} and d.candidate.budget_left == -37
        assert d.reference_state.waiting == (("B", 100),) and [r[0] for r in d.reference_state.running] == ["A"]
        assert any("over the budget of 64" in reason for reason in d.reasons)
        assert "differs from Scheduler at step 2" in str(result) and "<table>" in result._repr_html_()


def test_a_wrong_victim_is_caught_at_the_first_preemption() -> None:
    first_preemption = next(i for i, (_, preempted) in enumerate(_decisions(TIGHT)) if preempted)
    result = compare_schedulers(EarliestVictim, workload=TIGHT)
    d = result.first_difference
    assert d is not None and d.step == first_preemption
    assert d.reference.preempted != d.candidate.preempted and any("preempted" in r for r in d.reasons)


def test_broken_invariants_errors_and_unwritten_methods_are_reported_not_raised() -> None:
    left = compare_schedulers(LeftWaiting, workload=TIGHT)
    first_arrival = min(r.arrival_step for r in TIGHT.requests)
    assert left.first_difference is not None and left.first_difference.step == first_arrival
    assert any("both running and waiting" in r for r in left.first_difference.reasons)

    class Unwritten(SchedulerSkeleton):
        pass

    unwritten = compare_schedulers(Unwritten, workload=TIGHT)
    d = unwritten.first_difference
    assert d is not None and d.step == 0 and d.candidate.error is not None
    assert d.candidate.error.startswith("NotImplementedError") and "Its run stopped there" in str(unwritten)
    assert unwritten.steps.candidate_tokens.notna().sum() == 1, "its one step: the one that raised"


def test_another_eviction_order_is_caught_at_the_first_allocation() -> None:
    mru = compare_eviction(MostRecentlyFreed, workload=TIGHT)
    first_arrival = min(r.arrival_step for r in TIGHT.requests)  # an empty pool: 1, 2, 3 ... vs N, N-1 ...
    d = mru.first_difference
    assert d is not None and d.step == first_arrival
    assert d.reference_state.next_free_blocks[0] == 1 and d.candidate_state.next_free_blocks[0] == TIGHT.num_blocks - 1
    assert not compare_eviction(LFUEviction, workload=TIGHT).matched


def test_a_workload_from_a_saved_trace_keeps_its_requests_limits_and_hits() -> None:
    trace = Trace.load(SAVED_TRACE)
    workload = workload_from_trace(trace, worker_id=1)
    requests = trace.requests[trace.requests.worker_id == 1]
    assert len(workload) == len(requests) and workload.num_blocks == trace.meta["num_blocks"][1]
    assert workload.max_num_batched_tokens == trace.meta["max_num_batched_tokens"]
    assert sorted(r.num_prompt_tokens for r in workload.requests) == sorted(requests.num_prompt_tokens.astype(int))
    assert [r.req_id for r in workload.requests] == [f"r{i}" for i in range(len(workload))]
    result = compare_schedulers(ReferenceScheduler, workload=workload)
    assert result.matched, str(result)
    if requests.num_cached_tokens.sum() > 0:
        assert result.summary["Scheduler"]["prefix_hit_tokens"] > 0, "a shared prefix brings the hits back"


def test_the_simulation_makes_the_in_process_engines_decisions() -> None:
    """Oracle: ``LLM`` with the model, async scheduling as it runs; lengths alone decide, so made-up
    tokens give the same steps (ignore_eos: each request generates exactly max_tokens)."""
    shared = list(range(100, 140))
    prompts = [shared + [200 + i] * (5 + 13 * i) for i in range(5)] + [[7] * 90]
    max_tokens = [9, 4, 12, 6, 3, 8]
    llm = LLM(num_kv_blocks=14, max_num_batched_tokens=48)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    records = list(llm.engine.scheduler.records)
    names: dict[str, str] = {}
    for record in records:
        for entry in record.scheduled:
            names.setdefault(entry.req_id, f"p{len(names)}")
    engine_steps = [
        ({names[e.req_id]: e.num_tokens for e in r.scheduled}, sorted(names[q] for q in r.preempted)) for r in records
    ]
    workload = Workload.of(
        [(f"p{i}", 0, p, n) for i, (p, n) in enumerate(zip(prompts, max_tokens, strict=True))],
        num_blocks=llm.engine.kv_manager.pool.num_blocks,
        max_num_batched_tokens=48,
        max_model_len=llm.engine.max_model_len,
    )
    assert _decisions(workload) == engine_steps
    result = compare_schedulers(ReferenceScheduler, workload=workload)  # the comparison steps alike
    assert result.matched
    assert result.steps.reference_tokens.tolist() == [sum(tokens.values()) for tokens, _ in engine_steps]
    assert result.steps.reference_preempted.tolist() == [len(preempted) for _, preempted in engine_steps]
    assert any(preempted for _, preempted in engine_steps), "the small pool preempts"


def _decisions(workload: Workload) -> list[tuple[dict[str, int], list[str]]]:
    """The oracle for the comparisons: modkit's scheduler alone, stepped as the scheduler process steps
    it (plan, plan the next one ahead when it can, then the oldest step's tokens), written out here."""
    kv = KVCacheManager(workload.num_blocks, workload.block_size)
    scheduler = Scheduler(kv, workload.max_num_batched_tokens, workload.max_num_seqs, workload.max_model_len)
    queue = sorted(workload.requests, key=lambda r: r.arrival_step)  # stable: workload order among equals
    worker, steps, order = SimulatedWorker(scheduler), [], 0
    while queue or worker.busy:
        for ahead in (False, True):
            if ahead and not worker.may_plan_ahead():
                continue
            if not ahead and (worker.in_flight or not (queue or scheduler.has_unfinished_requests())):
                continue
            while queue and queue[0].arrival_step <= scheduler.step_count:
                r = queue.pop(0)
                params = SamplingParams(max_tokens=r.max_tokens)
                scheduler.add_request(Request(r.req_id, list(r.prompt_token_ids), params, arrival_time=float(order)))
                order += 1
            plan = worker.plan().plan
            steps.append((dict(plan.num_scheduled_tokens), sorted(plan.preempted_req_ids)))
        if worker.in_flight:
            worker.finish_oldest()
    return steps


def test_the_trial_of_a_whole_scheduler() -> None:
    assert try_scheduler(Scheduler, 64, 256, 1024) > 0
    assert try_scheduler(ReferenceScheduler, 2048, 4, 2048) > 0
    with pytest.raises(ValueError, match="over the budget"):
        try_scheduler(NoChunking, 64, 256, 1024)
    with pytest.raises(NotImplementedError):
        try_scheduler(SchedulerSkeleton, 64, 256, 1024)


# -- a whole scheduler class, by value, in a running pipeline -----------------------------------

QUESTIONS = [f"Tell me about the number {i}." for i in range(6)]


@pytest.fixture(scope="module")
def pipeline() -> Iterator[Pipeline]:
    with Pipeline.launch(num_kv_blocks=40, max_num_batched_tokens=64, progress=False, **free_ports()) as p:
        yield p


@pytest.fixture(scope="module")
def expected() -> list[str]:
    outs = LLM(num_kv_blocks=40, max_num_batched_tokens=64).chat(
        [[{"role": "user", "content": q}] for q in QUESTIONS],
        SamplingParams(temperature=0, max_tokens=32),
        use_tqdm=False,
    )
    return [o.outputs[0].text for o in outs]


def ask_all(p: Pipeline) -> list[str]:
    client = p.client(timeout=120)

    def ask(question: str) -> str:
        reply = client.chat.completions.create(
            model=p.model_name, messages=[{"role": "user", "content": question}], max_tokens=32, temperature=0
        )
        return str(reply.choices[0].message.content)

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        return list(pool.map(ask, QUESTIONS))


@pytest.mark.slow
def test_a_scheduler_class_by_value_serves_after_a_drain(pipeline: Pipeline, expected: list[str]) -> None:
    class MyScheduler(ReferenceScheduler):  # local: cloudpickle sends it by value, signed
        pass

    assert ask_all(pipeline) == expected
    with ThreadPoolExecutor(1) as pool:  # swapped while requests run: it drains first
        running = pool.submit(ask_all, pipeline)
        wait_until(lambda: pipeline.stats()["scheduler"]["num_requests_running"] > 0 or running.done(), 30)
        reply = pipeline.swap("scheduler", MyScheduler)
        assert running.result() == expected
    assert reply["implementation"].endswith("MyScheduler") and reply["drained"] is True
    health = pipeline.health()["scheduler"]
    assert health["scheduler"].endswith("MyScheduler") and health["last_swap_error"] is None
    pipeline.clear_trace()
    assert ask_all(pipeline) == expected, "the oracle's greedy outputs, under the class sent by value"
    assert len(pipeline.trace().steps) > 0

    class OverBudget(ReferenceScheduler):  # NoChunking, local: sent by value
        def schedule_waiting(self, step: StepDraft) -> None:
            step.budget = 10**9
            super().schedule_waiting(step)

    with pytest.raises(RemoteError, match="over the budget"):  # its trial refuses it: nothing changes
        pipeline.swap("scheduler", OverBudget)
    assert pipeline.health()["scheduler"]["scheduler"].endswith("MyScheduler")
    assert pipeline.swap("scheduler", "modkit")["previous"].endswith("MyScheduler")


@pytest.mark.slow
def test_a_scheduler_that_fails_while_serving_is_taken_over_with_nothing_lost(
    pipeline: Pipeline, expected: list[str]
) -> None:
    class FailsLater(ReferenceScheduler):
        def schedule_waiting(self, step: StepDraft) -> None:
            if self.step_count >= 3 and len(self.requests) > 5:  # the trial has five requests
                raise RuntimeError("too many for me")
            super().schedule_waiting(step)

    pipeline.swap("scheduler", FailsLater)
    pipeline.clear_trace()
    assert ask_all(pipeline) == expected, "taken over mid-run: the same greedy outputs"
    health = pipeline.health()["scheduler"]
    assert health["scheduler"] == "modkit" and "too many for me" in health["last_swap_error"]
    trace = pipeline.trace()
    assert list(trace.swaps.implementation) == ["modkit"] and trace.swaps.error.str.contains("too many").all()
    taken = trace.scheduled[trace.scheduled.kind == "preempted"]
    assert len(taken) > 0 and taken.reason.str.contains("takes over").all()
