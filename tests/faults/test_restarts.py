"""``Pipeline.restart`` of each component under traffic: every request finishes or gets an error.

For each of the six components, streaming chats (greedy, ``ignore_eos``, long enough to span
the restart) are in flight when the component is restarted. Each must end, finished or with
an error, within ``ANSWER_WITHIN_S`` of ``restart`` returning; none hangs (every client has
a bounded timeout). Finished ones must equal the in-process engine's greedy text (after a KV
cache manager, router or scheduler restart, every one must finish, and exactly). Afterwards
the pipeline serves a new request correctly, no KV block is held and the scheduler holds no
request: nothing is computed for a client that left.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from waiting import wait_until

from modkit import LLM, Pipeline, SamplingParams
from modkit.frontend import EMBEDDED_MODEL_NAME
from modkit.kvcache.service import KVCacheService, UnknownGeneration
from modkit.protocol import KVAdmit

NUM_STREAMS = 8
MAX_TOKENS = 256
LONG_MAX_TOKENS = 1000  # for clients cut off by a frontend restart: far longer than the restart
ANSWER_WITHIN_S = 5.0  # after restart() returns, each request running gets a token or its end within this
END_WITHIN_S = 60.0  # after restart() returns, every request has ended
CLIENT_TIMEOUT_S = 60.0  # no client waits longer than this for a byte
QUESTIONS = ["Hello!", "What does a cow say?", "Who are you?", "What color is the sky?"]
CONVERSATIONS = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(NUM_STREAMS)]


@dataclass
class Stream:
    """One streaming chat: what it received, and how it ended."""

    text: str = ""
    num_chunks: int = 0
    chunk_times: list[float] = field(default_factory=list)  # time.monotonic() of each chunk
    finish_reason: str | None = None
    error: str | None = None
    ended_at: float | None = None  # time.monotonic()


def _run(url: str, messages: list[dict[str, str]], out: Stream, max_tokens: int = MAX_TOKENS) -> None:
    body = {
        "model": EMBEDDED_MODEL_NAME,
        "messages": messages,
        "temperature": 0,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=CLIENT_TIMEOUT_S) as response:
            if response.status_code != 200:
                out.error = f"HTTP {response.status_code}: {response.read()!r}"
                return
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = chunk["error"]["message"]
                    return
                choice = chunk["choices"][0]
                out.text += choice["delta"].get("content") or ""
                out.num_chunks += 1
                out.chunk_times.append(time.monotonic())
                out.finish_reason = choice.get("finish_reason") or out.finish_reason
    except httpx.HTTPError as error:  # a restarted frontend: the connection is gone
        out.error = repr(error)
    finally:
        out.ended_at = time.monotonic()
    if out.finish_reason is None and out.error is None:
        out.error = "the stream ended without a finish_reason"


def test_the_kv_cache_manager_applies_a_retried_call_once_and_refuses_a_stranger() -> None:
    """What the scheduler's client relies on to retry and to notice a restart (modkit.kvcache.client)."""
    service = KVCacheService([16], 4)
    try:
        service.reset(0, "g1")
        first = service.apply(0, [KVAdmit("a", list(range(1, 11)), 0, 16)], "g1", seq=1)
        again = service.apply(0, [KVAdmit("a", list(range(1, 11)), 0, 16)], "g1", seq=1)  # its reply was lost
        assert again == first and service.block_tables(0) == {"a": first.results[0][0]}
        with pytest.raises(UnknownGeneration):  # a restarted manager, or another scheduler's pool
            service.apply(0, [KVAdmit("b", [1, 2], 0, 16)], "g0", seq=2)
        assert set(service.block_tables(0)) == {"a"}, "nothing of a refused call was applied"
        service.reset(0, "g2")  # a new scheduler takes the pool: the old one's blocks are freed
        assert service.block_tables(0) == {} and service.pools[0].num_free_blocks == 15
        service.check_invariants(0)
    finally:
        service.close()


@pytest.fixture(scope="module")
def expected() -> list[str]:
    """The in-process engine's greedy text for each conversation: the oracle."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = LLM(num_kv_blocks=512).chat(CONVERSATIONS, params, use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


@pytest.fixture(scope="module")
def pipeline() -> Iterator[Pipeline]:
    with Pipeline.launch(
        num_workers=2, num_kv_blocks=256, max_model_len=1024, router_policy="round_robin", ports="auto", progress=False
    ) as p:
        yield p


def _start(
    p: Pipeline, conversations: list[list[dict[str, str]]], max_tokens: int
) -> tuple[list[Stream], list[threading.Thread]]:
    streams = [Stream() for _ in conversations]
    threads = [
        threading.Thread(target=_run, args=(p.url, messages, out, max_tokens), daemon=True)
        for messages, out in zip(conversations, streams, strict=True)
    ]
    for thread in threads:
        thread.start()
    return streams, threads


def _restart_under_traffic(
    p: Pipeline, component: str, max_tokens: int = MAX_TOKENS, kill: int | None = None
) -> tuple[list[Stream], float]:
    """Restart ``component`` while half the streams are under way (each has tokens) and the other half
    arrive as it stops (first SIGKILLed: pid ``kill``); every stream must hear from the pipeline (a
    token or its end) within ANSWER_WITHIN_S of ``restart`` returning, and end."""
    half = NUM_STREAMS // 2
    streams, threads = _start(p, CONVERSATIONS[:half], max_tokens)
    assert wait_until(lambda: all(s.num_chunks >= 3 or s.ended_at for s in streams), 60), streams
    old = p.processes[component]
    if kill is not None:
        os.kill(kill, signal.SIGKILL)
    restarting = threading.Thread(target=p.restart, args=(component,))
    restarting.start()
    assert wait_until(lambda: old.returncode is not None, 30), f"{component} did not stop"
    late_streams, late_threads = _start(p, CONVERSATIONS[half:], max_tokens)  # sent while it is down
    streams, threads = streams + late_streams, threads + late_threads
    restarting.join(timeout=120)
    assert not restarting.is_alive(), f"restart({component!r}) did not return"
    back = time.monotonic()
    for thread in threads:
        thread.join(timeout=max(0.0, back + END_WITHIN_S - time.monotonic()))
    hanging = [i for i, t in enumerate(threads) if t.is_alive()]
    assert not hanging, f"streams {hanging} neither finished nor failed {END_WITHIN_S} s after the restart"
    # How long each waited, after the restart, for its next token or its end (0: it ended before).
    waits = [_next_answer(s, back) - back for s in streams]
    assert max(waits) <= ANSWER_WITHIN_S, f"streams waited up to {max(waits):.1f} s after the restart"
    finished = sum(s.error is None for s in streams)
    print(
        f"\n{component}: {finished} finished, {NUM_STREAMS - finished} errored; after restart returned, "
        f"{sum(w > 0 for w in waits)} still running, the longest wait for a token or an end {max(waits):.2f} s, "
        f"the last end {max(0.0, *(s.ended_at - back for s in streams if s.ended_at)):.2f} s"
    )
    return streams, back


def _next_answer(stream: Stream, back: float) -> float:
    """When ``stream`` next heard from the pipeline at or after ``back`` (a token, its end); ``back`` if it ended."""
    assert stream.ended_at is not None
    if stream.ended_at <= back:
        return back
    return min([t for t in stream.chunk_times if t >= back] + [stream.ended_at])


def _check_clean(p: Pipeline, expected: list[str]) -> None:
    """Nothing left behind: no request in the scheduler, no block held; and a new request is served right."""

    def idle() -> bool:
        stats = p.stats()
        scheduler, kv = stats["scheduler"], stats["kv_cache_manager"]
        return scheduler["num_requests_running"] + scheduler["num_requests_waiting"] == 0 and all(
            pool["num_requests_holding_blocks"] == 0 for pool in kv["pools"]
        )

    assert wait_until(idle, 30, interval_s=0.2), p.stats()
    fresh = Stream()
    _run(p.url, CONVERSATIONS[0], fresh)
    assert fresh.error is None and fresh.text == expected[0], fresh


def _num_kv_rebuilds(p: Pipeline) -> int:
    return sum(w["num_kv_rebuilds"] for w in p.stats()["scheduler"]["workers"])


@pytest.mark.parametrize("component", ["kv_cache_manager", "router", "scheduler"])
def test_a_restart_loses_no_request(pipeline: Pipeline, expected: list[str], component: str) -> None:
    rebuilds = _num_kv_rebuilds(pipeline)
    streams, _ = _restart_under_traffic(pipeline, component)
    assert [s.error for s in streams] == [None] * NUM_STREAMS, [s.error for s in streams]
    if component == "kv_cache_manager":  # the scheduler noticed, and recomputed what the old one held
        assert _num_kv_rebuilds(pipeline) > rebuilds
    assert [s.text for s in streams] == expected
    _check_clean(pipeline, expected)


@pytest.mark.parametrize("component", ["sampler", "worker-0"])
def test_a_restart_ends_every_request(pipeline: Pipeline, expected: list[str], component: str) -> None:
    streams, _ = _restart_under_traffic(pipeline, component)
    for stream, text in zip(streams, expected, strict=True):
        assert stream.error is not None or stream.text == text, (stream, text)
    _check_clean(pipeline, expected)


def test_a_restarted_frontend_leaves_nothing_computing(pipeline: Pipeline, expected: list[str]) -> None:
    # Longer than the restart: the old frontend's clients are cut off while their requests run.
    streams, back = _restart_under_traffic(pipeline, "frontend", max_tokens=LONG_MAX_TOKENS)
    # Cut off (the frontend's stop closes open streams after 1 s), or finished before that on a quick machine.
    assert all(s.error is not None or s.finish_reason == "length" for s in streams), streams
    # Aborted (by the old frontend as it closed, or by the new one when their outputs came), not run to the end.
    assert wait_until(lambda: _num_requests(pipeline) == 0, back + ANSWER_WITHIN_S - time.monotonic())
    _check_clean(pipeline, expected)


def test_the_requests_of_a_killed_frontend_are_aborted(pipeline: Pipeline, expected: list[str]) -> None:
    # Held at the scheduler while their frontend is killed (it cannot abort them) and restarted: once let
    # in, their outputs reach a frontend that does not know them, which aborts them.
    pipeline.hold_requests(True)
    try:
        streams, threads = _start(pipeline, CONVERSATIONS[:4], LONG_MAX_TOKENS)
        assert wait_until(lambda: pipeline.hold_requests(True) == 4, 30)
        os.kill(pipeline.pids()["frontend"], signal.SIGKILL)
        pipeline.restart("frontend")
    finally:
        pipeline.hold_requests(False)
    back = time.monotonic()
    for thread in threads:
        thread.join(timeout=10)
    assert all(s.error is not None and s.num_chunks == 0 for s in streams), streams
    assert wait_until(lambda: _num_requests(pipeline) == 0, ANSWER_WITHIN_S), pipeline.stats()["scheduler"]
    print(f"\nkilled frontend: 4 requests aborted {time.monotonic() - back:.2f} s after the hold ended")
    assert pipeline.stats()["frontend"]["num_orphans_aborted"] == 4, "the new frontend aborted each once"
    _check_clean(pipeline, expected)


def _num_requests(p: Pipeline) -> int:
    scheduler = p.stats()["scheduler"]
    return int(scheduler["num_requests_running"] + scheduler["num_requests_waiting"])
