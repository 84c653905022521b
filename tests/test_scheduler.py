"""The scheduler on its own: token budget, chunking, admission, preemption, the diff it sends.

These run the real Scheduler and KVCacheManager; the "model" is a function that returns a
fixed next token, since what is tested is who gets how many tokens, not what they compute.
"""

from __future__ import annotations

import pytest

from modkit.kvcache import BlockStored, EventLog, KVCacheManager
from modkit.request import Request, RequestStatus
from modkit.sampling_params import SamplingParams
from modkit.scheduler import ModelRunnerOutput, Scheduler, SchedulerOutput
from modkit.scheduler.output import MAX_STEP_RECORDS, MAX_WAITING_REASONS

EOS = 2


def make(req_id: str, n: int, max_tokens: int = 4, arrival: float = 0.0, priority: int = 0, **kw) -> Request:
    params = SamplingParams(max_tokens=max_tokens, **kw)
    return Request(req_id, [10 + i for i in range(n)], params, (EOS,), arrival_time=arrival, priority=priority)


def finish_step(scheduler: Scheduler, out: SchedulerOutput, token: int = 7) -> None:
    """Sample ``token`` for every request whose known tokens are now all computed."""
    done = [
        r
        for r in out.num_scheduled_tokens
        if scheduler.requests[r].num_computed_tokens == scheduler.requests[r].num_tokens
    ]
    scheduler.update_from_output(out, ModelRunnerOutput(done, [token] * len(done)))
    scheduler.check_invariants()


def test_budget_chunks_a_long_prompt_and_serves_running_requests_first() -> None:
    s = Scheduler(KVCacheManager(64, 4), max_num_batched_tokens=10)
    s.add_request(make("short", 3, arrival=0))
    s.add_request(make("long", 25, arrival=1))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"short": 3, "long": 7}  # the long prompt gets the rest
    assert [n.req_id for n in out.scheduled_new_reqs] == ["short", "long"]
    finish_step(s, out)
    out = s.schedule()
    # "short" decodes (1 token) first, then "long" continues its prompt with what is left.
    assert out.num_scheduled_tokens == {"short": 1, "long": 9}
    assert [c.req_id for c in out.scheduled_cached_reqs] == ["short", "long"]
    assert out.scheduled_cached_reqs[0].new_token_ids == [7]  # the token sampled last step
    assert out.scheduled_cached_reqs[1].new_token_ids == []  # still in its prompt
    kinds = {e.req_id: e.kind for e in s.last_record.scheduled}  # type: ignore[union-attr]
    assert kinds == {"short": "decode", "long": "prompt"}
    assert s.last_record.tokens_used == 10  # type: ignore[union-attr]


def test_a_one_token_last_prompt_chunk_is_a_prompt_chunk_not_a_decode() -> None:
    """The step record's kinds: a prompt whose last chunk is a single token is still a prefill."""
    s = Scheduler(KVCacheManager(64, 4), max_num_batched_tokens=8)
    s.add_request(make("r", 9))
    kinds = []
    for _ in range(3):
        out = s.schedule()
        assert s.last_record is not None
        kinds += [(e.kind, e.num_tokens) for e in s.last_record.scheduled]
        finish_step(s, out)
    assert kinds == [("prompt", 8), ("prompt", 1), ("decode", 1)]


def test_max_num_seqs_holds_back_admissions_with_a_reason() -> None:
    s = Scheduler(KVCacheManager(64, 4), max_num_seqs=2)
    for i in range(3):
        s.add_request(make(f"r{i}", 4, arrival=i))
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["r0", "r1"]
    assert "max_num_seqs" in s.last_record.waiting["r2"]  # type: ignore[union-attr]


def test_a_long_queue_names_the_reasons_of_the_first_in_line_and_counts_the_rest() -> None:
    s = Scheduler(KVCacheManager(1024, 4), max_num_seqs=2)
    for i in range(200):
        s.add_request(make(f"r{i}", 4, arrival=i))
    s.schedule()
    record = s.last_record
    assert record is not None and record.num_waiting == 198
    assert list(record.waiting) == [f"r{i}" for i in range(2, 2 + MAX_WAITING_REASONS)]  # in line, in order
    assert "max_num_seqs" in record.waiting["r2"] and record.waiting["r3"] == "queued behind r2"


def test_a_long_run_keeps_the_records_of_its_last_steps_only() -> None:
    s = Scheduler(KVCacheManager(1024, 4))
    s.add_request(make("long", 4, max_tokens=MAX_STEP_RECORDS + 50))
    while s.has_unfinished_requests():
        out = s.schedule()
        s.update_from_output(out, ModelRunnerOutput(["long"], [7]))
    assert s.step_count == MAX_STEP_RECORDS + 50
    assert len(s.records) == MAX_STEP_RECORDS and s.records[-1] is s.last_record
    assert [r.step for r in (s.records[0], s.records[-1])] == [50, MAX_STEP_RECORDS + 49]


def test_requests_finish_on_eos_stop_ids_and_max_tokens() -> None:
    s = Scheduler(KVCacheManager(64, 4))
    s.add_request(make("eos", 3, max_tokens=10))
    s.add_request(make("stop_id", 3, max_tokens=10, stop_token_ids=[9]))
    s.add_request(make("length", 3, max_tokens=2))
    s.add_request(make("min", 3, max_tokens=10, min_tokens=2))
    out = s.schedule()
    results = s.update_from_output(out, ModelRunnerOutput(["eos", "stop_id", "length", "min"], [EOS, 9, 5, EOS]))
    reasons = {r.req_id: (r.finish_reason, r.stop_reason) for r in results}
    assert reasons == {"eos": ("stop", None), "stop_id": ("stop", 9), "length": (None, None), "min": (None, None)}
    out = s.schedule()
    assert out.finished_req_ids == {"eos", "stop_id"}  # the worker is told to drop them
    results = s.update_from_output(out, ModelRunnerOutput(["length", "min"], [5, EOS]))
    assert {r.req_id: r.finish_reason for r in results} == {"length": "length", "min": "stop"}
    assert not s.has_unfinished_requests()
    assert s.kv.num_free_blocks == 63


def test_preemption_frees_the_latest_arrival_and_it_is_recomputed() -> None:
    # 6 usable blocks of 4 tokens; two requests of 8 prompt tokens each take 4 blocks.
    s = Scheduler(KVCacheManager(7, 4), max_num_batched_tokens=64)
    s.add_request(make("first", 8, max_tokens=12, arrival=0))
    s.add_request(make("second", 8, max_tokens=12, arrival=1))
    preempted_at = None
    for step in range(40):
        if not s.has_unfinished_requests():
            break
        out = s.schedule()
        if out.preempted_req_ids:
            preempted_at = step
            assert out.preempted_req_ids == {"second"}
            assert s.requests["second"].status == RequestStatus.PREEMPTED
            assert s.requests["second"].num_computed_tokens == 0
            assert s.last_record.preempted["second"].startswith("no free KV block for")  # type: ignore[union-attr]
        finish_step(s, out)
    assert preempted_at is not None and not s.has_unfinished_requests()
    assert s.num_preemptions >= 1
    # The preempted request came back as a new request carrying its outputs so far.
    resumed = [r for rec in s.records for r in rec.scheduled if r.req_id == "second" and r.kind == "prompt"]
    assert len(resumed) >= 2
    assert s.kv.num_free_blocks == 6


def test_priority_policy_admits_urgent_requests_first() -> None:
    s = Scheduler(KVCacheManager(64, 4), max_num_seqs=1, policy="priority")
    s.add_request(make("late-but-urgent", 4, arrival=5, priority=0))
    s.add_request(make("early", 4, arrival=0, priority=3))
    assert list(s.schedule().num_scheduled_tokens) == ["late-but-urgent"]


def test_prefix_hit_is_skipped_on_admission() -> None:
    s = Scheduler(KVCacheManager(64, 4))
    s.add_request(make("a", 10))
    finish_step(s, s.schedule())
    s.add_request(make("b", 10))  # same prompt: 2 full blocks cached (the last token is recomputed)
    out = s.schedule()
    assert out.num_scheduled_tokens["b"] == 2
    new_b = next(n for n in out.scheduled_new_reqs if n.req_id == "b")
    assert new_b.num_computed_tokens == 8 and new_b.block_ids[:2] == s.kv.get_block_ids("a")[:2]


def test_bad_requests_and_settings_are_refused() -> None:
    s = Scheduler(KVCacheManager(64, 4), max_model_len=16)
    with pytest.raises(ValueError, match="limit is 16"):
        s.add_request(make("too-long", 16))
    s.add_request(make("ok", 4))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(make("ok", 4))
    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(KVCacheManager(8, 4), max_num_seqs=0)
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        Scheduler(KVCacheManager(8, 4), policy="random")


def test_abort_frees_blocks_and_tells_the_worker() -> None:
    s = Scheduler(KVCacheManager(16, 4))
    s.add_request(make("a", 9))
    s.schedule()
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert s.kv.num_free_blocks == 15 and not s.has_unfinished_requests()
    assert s.schedule().finished_req_ids == {"a"}
    s.check_invariants()


def test_blocks_become_findable_only_after_their_step_ran() -> None:
    events = EventLog()
    s = Scheduler(KVCacheManager(16, 4, event_sink=events))
    a = make("a", 10)
    s.add_request(a)
    out = s.schedule()
    # Allocated, not yet computed: nothing is cached, no BlockStored is published.
    assert s.kv.stats().num_blocks_cached == 0 and events.events == []
    finish_step(s, out)
    assert s.kv.stats().num_blocks_cached == 2
    [stored] = events.events
    assert isinstance(stored, BlockStored) and stored.token_ids == a.prompt_token_ids[:8]
