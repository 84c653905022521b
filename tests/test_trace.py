"""The event stream of a real pipeline, and the trace built from it, checked against what
the components themselves report (``/stats``) and what the OpenAI API returned.

One pipeline with a small KV cache (so requests are preempted), a small token budget (so
prompts are chunked) and a shared system prompt (so prefixes are hit) runs the workload
once; the tests read its trace.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from test_pipeline import free_ports
from waiting import wait_until

from modkit import Pipeline
from modkit.trace import Trace
from modkit.trace.events import RequestArrived, RequestDone, StepEvent, TokensOut

pytestmark = pytest.mark.slow  # the trace of a launched pipeline

SYSTEM = "You are a helpful assistant. You answer briefly, kindly and always in English. " * 2
BUDGET = 48  # tokens a step: the ~60-token prompts take two chunks


@pytest.fixture(scope="module")
def run() -> Iterator[tuple[Pipeline, Trace, list[Any]]]:
    with Pipeline.launch(
        num_kv_blocks=24, max_num_batched_tokens=BUDGET, seed=0, progress=False, **free_ports()
    ) as pipeline:
        client = pipeline.client()

        def ask(i: int) -> Any:
            return client.chat.completions.create(
                model=pipeline.model_name,
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Tell me about {i}."}],
                max_tokens=40 + 4 * i,
                temperature=0,
                extra_body={"ignore_eos": True},
            )

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(ask, range(12)))
        # A reply returns while the last events of its request may still be on their way: trace()
        # waits until the recorder has every event published before it (Recorder.catch_up).
        yield pipeline, pipeline.trace(), replies


def test_the_trace_is_complete_when_the_last_reply_is_in(run: tuple[Pipeline, Trace, list[Any]]) -> None:
    _, trace, replies = run
    assert run_is_traced(trace, {r.id for r in replies})


def run_is_traced(trace: Trace, req_ids: set[str]) -> bool:
    """Every request finished, every step's record and forward in, and every block given back."""
    finished = trace.requests.dropna(subset=["finish_reason"])
    return (
        req_ids <= set(finished.req_id)
        and len(trace.forwards) == len(trace.steps)
        and trace.block_state(0).counts()["held"] == 0
    )


def test_each_request_is_traced_from_arrival_to_finish(run: tuple[Pipeline, Trace, list[Any]]) -> None:
    _, trace, replies = run
    requests = trace.requests.set_index("req_id")
    assert set(requests.index) == {r.id for r in replies}
    for reply in replies:
        row = requests.loc[reply.id]
        assert row.arrival <= row.queued <= row.first_scheduled <= row.first_token <= row.finished
        assert row.num_output_tokens == reply.usage.completion_tokens
        assert row.num_prompt_tokens == reply.usage.prompt_tokens
        assert row.finish_reason == reply.choices[0].finish_reason == "length"
        tokens = trace.tokens[trace.tokens.req_id == reply.id]
        assert tokens.num_tokens.sum() == reply.usage.completion_tokens
        assert tokens.itl.isna().sum() == 1 and (tokens.itl.dropna() >= 0).all()
    assert (requests.ttft > 0).all() and (requests.e2e >= requests.ttft).all()
    # Each was routed once, to the one worker, knowing at most its prompt's blocks as cached there. (Whether
    # the shared prompt is still cached when a later request is routed depends on the machine's timing:
    # 24 blocks, 8 requests at a time, preemptions. test_pipeline's KV-aware routing test checks learning.)
    routes = trace.routes
    assert sorted(routes.req_id) == sorted(r.id for r in replies) and (routes.worker_id == 0).all()
    assert (routes.cached_0 <= routes.num_prompt_blocks).all()


def test_step_records_show_chunked_prompts_preemptions_and_the_budget(run: tuple[Pipeline, Trace, list[Any]]) -> None:
    _, trace, _ = run
    steps, scheduled = trace.steps, trace.scheduled
    assert (steps.tokens_used <= BUDGET).all() and (steps.token_budget == BUDGET).all()
    assert (steps.num_prompt_tokens + steps.num_decode_tokens == steps.tokens_used).all()
    by_step = scheduled[scheduled.kind != "preempted"].groupby("step").num_tokens.sum()
    assert (by_step == steps.set_index("step").tokens_used.loc[by_step.index]).all()
    # 24 blocks of 16 tokens cannot hold 8 requests of ~100 tokens: some lose their blocks.
    preempted = scheduled[scheduled.kind == "preempted"]
    assert len(preempted) == steps.num_preempted.sum() > 0
    assert preempted.reason.str.startswith("no free KV block").all()
    for row in preempted.itertuples():  # a preempted request starts over: a prompt again, from its cached prefix
        later = scheduled[(scheduled.req_id == row.req_id) & (scheduled.step > row.step)]
        assert later.iloc[0].kind == "prompt"
    # A prompt longer than what was left of the budget is computed in chunks, each starting where the last ended.
    prompts = scheduled[(scheduled.kind == "prompt") & ~scheduled.req_id.isin(set(preempted.req_id))]
    assert prompts.groupby("req_id").size().max() >= 2, "no prompt was chunked"
    for _, chunks in prompts.sort_values("step").groupby("req_id"):
        ends = (chunks.num_computed_tokens + chunks.num_tokens).to_numpy()
        assert (chunks.num_computed_tokens.to_numpy()[1:] == ends[:-1]).all()
    # The worker's own timing covers exactly the scheduler's steps.
    forwards = trace.forwards.set_index("step")
    assert list(forwards.index) == list(steps.step)
    assert (forwards.num_tokens.to_numpy() == steps.tokens_used.to_numpy()).all()
    assert (steps.forward_s <= steps.step_s).all()


def test_prefix_hits_and_blocks_agree_with_the_kv_cache_manager(run: tuple[Pipeline, Trace, list[Any]]) -> None:
    pipeline, trace, _ = run
    pool = pipeline.stats()["kv_cache_manager"]["pools"][0]
    steps = trace.steps
    assert steps.prefix_cache_queries.sum() == pool["prefix_cache_queries"]
    assert steps.prefix_cache_hits.sum() == pool["prefix_cache_hits"] > 0
    assert trace.prefix_hit_rate() == pool["prefix_cache_hits"] / pool["prefix_cache_queries"]
    # Replaying the block events ends where the pool is: nothing held, the same blocks cached.
    state = trace.block_state(0)
    assert state.num_blocks == 24 == trace.num_blocks(0)
    assert state.counts()["held"] == 0 and state.counts()["free"] == pool["kv_blocks_total"]
    assert state.counts()["cached_free"] == pool["kv_blocks_cached"] > 0
    # Mid-run, the held blocks are the blocks of the requests then running, shared prefix blocks among them.
    middle = trace.steps.start.iloc[len(trace.steps) // 2]
    mid = trace.block_state(0, at=middle)
    assert 0 < mid.counts()["held"] <= 23
    assert mid.counts()["shared"] > 0, "the shared system prompt's blocks are held by several requests"
    kinds = set(trace.blocks.kind)
    assert {"allocated", "hit", "cached", "freed", "evicted"} <= kinds


def test_a_trace_survives_a_file(run: tuple[Pipeline, Trace, list[Any]], tmp_path: Path) -> None:
    _, trace, _ = run
    for name in ("trace.json", "trace.json.gz"):
        loaded = Trace.load(trace.save(tmp_path / name))
        assert loaded.meta == trace.meta
        for frame in ("steps", "scheduled", "requests", "tokens", "blocks", "forwards", "routes"):
            pd.testing.assert_frame_equal(getattr(loaded, frame), getattr(trace, frame))
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a modkit trace"):
        Trace.load(tmp_path / "other.json")


def test_a_subscriber_sees_a_request_through_in_order_and_misses_nothing(
    run: tuple[Pipeline, Trace, list[Any]],
) -> None:
    pipeline, _, _ = run
    with pipeline.events() as stream:
        reply = pipeline.client().completions.create(
            model=pipeline.model_name, prompt="Once upon a time", max_tokens=5, temperature=0
        )
        seen: list[Any] = []
        while not any(isinstance(e, RequestDone) for e in seen):
            event = stream.recv(10.0)
            assert event is not None, f"the stream went quiet after {seen}"
            seen.append(event)
        assert stream.missed == 0
    # One socket merges several publishers, so arrival order is by publisher; time stamps order them all.
    arrived = next(e for e in seen if isinstance(e, RequestArrived) and e.req_id == reply.id)
    steps = [e for e in seen if isinstance(e, StepEvent) and any(s.req_id == reply.id for s in e.scheduled)]
    done = next(e for e in seen if isinstance(e, RequestDone) and e.req_id == reply.id)
    assert arrived.ts <= steps[0].started <= steps[-1].started <= done.ts
    assert [s.step for s in steps] == list(range(steps[0].step, steps[0].step + len(steps)))  # one step per token
    assert sum(e.counts.get(reply.id, 0) for e in seen if isinstance(e, TokensOut)) == 5


def test_a_client_that_leaves_is_traced_as_an_abort(run: tuple[Pipeline, Trace, list[Any]]) -> None:
    pipeline, _, _ = run
    pipeline.clear_trace()
    body = {"model": pipeline.model_name, "prompt": "Hi", "max_tokens": 300, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{pipeline.url}/v1/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # one token, then hang up

    def finished_and_freed(trace: Trace) -> bool:
        return trace.requests.finish_reason.notna().any() and trace.block_state(0).counts()["held"] == 0

    wait_until(lambda: finished_and_freed(pipeline.trace(settle_s=0)), 10)
    trace = pipeline.trace()
    assert list(trace.requests.dropna(subset=["finish_reason"]).finish_reason) == ["abort"]
    assert trace.block_state(0).counts()["held"] == 0


def test_the_recorder_keeps_at_most_max_events(run: tuple[Pipeline, Trace, list[Any]]) -> None:
    from modkit.trace import Recorder

    pipeline, _, _ = run
    recorder = Recorder(pipeline.events(), {}, max_events=10)
    try:
        pipeline.client().completions.create(model=pipeline.model_name, prompt="Hi", max_tokens=20, temperature=0)
        wait_until(lambda: recorder.dropped > 0, 10)
        assert recorder.num_events == 10 and recorder.dropped > 0
        assert len(recorder.trace()) == 10 and recorder.trace().meta["dropped"] == recorder.dropped
    finally:
        recorder.close()


def test_a_trace_waits_for_a_recorder_that_fell_behind(run: tuple[Pipeline, Trace, list[Any]]) -> None:
    """The recorder shares its process with the notebook, which can keep it from its events
    for seconds; here it is kept from storing them (its lock held) while requests are served.
    The events wait in the queue; ``trace()`` waits for them, not for a quiet spell."""
    pipeline, _, _ = run
    recorder = pipeline.recorder
    assert recorder is not None
    pipeline.clear_trace()
    with recorder._lock:  # the recorder's thread reads a batch, then waits here to store it
        replies = [
            pipeline.client().completions.create(model=pipeline.model_name, prompt=f"Count to {i}:", max_tokens=8)
            for i in range(3)
        ]
        assert recorder.num_events == 0
    trace = pipeline.trace(settle_s=1e-3)
    assert run_is_traced(trace, {r.id for r in replies}) and "behind" not in trace.meta
    assert trace.summary().num_output_tokens == sum(r.usage.completion_tokens for r in replies)


def test_a_trace_does_not_wait_for_a_component_that_does_not_answer(
    run: tuple[Pipeline, Trace, list[Any]],
) -> None:
    """A stopped (or dead) publisher cannot mark its stream: ``trace()`` waits for it only as long
    as its call takes to time out, and names it in ``meta["behind"]``."""
    pipeline, _, _ = run
    router = pipeline.pids()["router"]
    os.kill(router, signal.SIGSTOP)
    try:
        started = time.monotonic()
        trace = pipeline.trace()
        waited = time.monotonic() - started
    finally:
        os.kill(router, signal.SIGCONT)
    assert trace.meta["behind"] == ["router"] and waited < 10
    assert "behind" not in pipeline.trace().meta  # answering again
