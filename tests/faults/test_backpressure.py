"""Overload is answered by fast 429s, and a client that leaves stops costing the server.

One six-process pipeline for the module, with ``max_queued_requests=8``: a burst far
above that gets 429s with ``Retry-After`` at once; the requests let in finish with the
tokens they would have had alone; none is lost; no KV block is held afterwards. A
non-streaming request whose client hangs up is aborted (``num_aborted``), its blocks freed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from waiting import wait_until

from modkit import Pipeline
from modkit.config import PipelineConfig
from modkit.frontend import EMBEDDED_MODEL_NAME

MAX_QUEUED = 8
QUESTIONS = ["Hello!", "What does a cow say?", "Who are you?", "What color is the sky?"]


def chat(question: str, **fields: Any) -> dict[str, Any]:
    return {"model": EMBEDDED_MODEL_NAME, "messages": [{"role": "user", "content": question}], **fields}


@pytest.fixture(scope="module")
def pipeline() -> Iterator[Pipeline]:
    # Two running at a time, so that long requests keep the queue full while the tests probe it.
    config = PipelineConfig(num_kv_blocks=512, max_model_len=1024, max_num_seqs=2, max_queued_requests=MAX_QUEUED)
    with Pipeline.launch(config, ports="auto", progress=False, record=False) as p:
        yield p


def idle(p: Pipeline) -> bool:
    """Nothing running, queued or holding a KV block anywhere in the pipeline."""
    stats = p.stats()
    pool = stats["kv_cache_manager"]["pools"][0]
    return (
        stats["scheduler"]["num_requests_running"] == 0
        and stats["scheduler"]["num_requests_waiting"] == 0
        and stats["frontend"]["num_requests_queued"] == 0
        and pool["num_requests_holding_blocks"] == 0
        and pool["kv_blocks_free"] == pool["kv_blocks_total"]
    )


async def burst(url: str, bodies: list[dict[str, Any]]) -> list[tuple[int, float, httpx.Response]]:
    """Every body sent at once; (status, seconds to the answer, response) for each."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(body: dict[str, Any]) -> tuple[int, float, httpx.Response]:
            start = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body)
            return response.status_code, time.perf_counter() - start, response

        return await asyncio.gather(*(one(b) for b in bodies))


def test_a_burst_far_above_the_queue_gets_fast_429s_and_loses_nothing(pipeline: Pipeline) -> None:
    bodies = [chat(QUESTIONS[i % 4], max_tokens=16, temperature=0) for i in range(200)]
    results = asyncio.run(burst(pipeline.url, bodies))
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 429} and len(statuses) == 200, statuses  # each answered, none lost
    refused = [(seconds, r) for status, seconds, r in results if status == 429]
    assert len(refused) > 100 and statuses.count(200) >= MAX_QUEUED, statuses
    for _, r in refused:
        error = r.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert int(r.headers["retry-after"]) >= 1
    # Seen from this client (200 coroutines opening 200 connections on two cores, ~1 s for
    # the lot) the 429s are not 50 ms each; the server's own time to one is what
    # test_with_the_queue_full_a_request_gets_its_429_within_50_ms measures. Here: no hang.
    assert max(seconds for seconds, _ in refused) < 5, refused
    assert pipeline.stats()["frontend"]["num_requests_refused_queue_full"] >= len(refused)

    assert wait_until(lambda: idle(pipeline), 30), pipeline.stats()
    with httpx.Client(base_url=pipeline.url, timeout=60) as client:
        alone = {q: client.post("/v1/chat/completions", json=chat(q, max_tokens=16, temperature=0)) for q in QUESTIONS}
    for body, (status, _, r) in zip(bodies, results, strict=True):
        if status == 200:
            question = body["messages"][0]["content"]
            assert r.json()["choices"] == alone[question].json()["choices"], question


def test_with_the_queue_full_a_request_gets_its_429_within_50_ms(pipeline: Pipeline) -> None:
    assert wait_until(lambda: idle(pipeline), 30), pipeline.stats()
    latencies = asyncio.run(probe_a_full_queue(pipeline.url))
    print("429 latencies (ms):", [round(x * 1000, 1) for x in latencies])
    assert max(latencies) < 0.05, latencies
    assert wait_until(lambda: idle(pipeline), 30), pipeline.stats()  # the long ones left: aborted


async def probe_a_full_queue(url: str) -> list[float]:
    """Seconds to a 429 for 20 requests sent one by one while long requests fill the queue."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client, httpx.AsyncClient(base_url=url) as probe:
        long = chat("Hello!", max_tokens=500, ignore_eos=True)
        filling = [asyncio.ensure_future(client.post("/v1/chat/completions", json=long)) for _ in range(12)]

        async def full() -> bool:
            return bool((await probe.get("/stats")).json()["num_requests_queued"] == MAX_QUEUED)

        deadline = time.monotonic() + 30
        while not await full():  # polled: the condition lives in another process
            assert time.monotonic() < deadline, "the long requests never filled the queue"
            await asyncio.sleep(0.05)
        await probe.get("/health")  # a warm connection: time the server, not the handshake
        latencies = []
        for _ in range(20):
            start = time.perf_counter()
            response = await probe.post("/v1/chat/completions", json=chat("Hi", max_tokens=4))
            latencies.append(time.perf_counter() - start)
            assert response.status_code == 429 and response.headers["retry-after"] == "1"
        for task in filling:  # hang up: the frontend aborts them
            task.cancel()
        await asyncio.gather(*filling, return_exceptions=True)
        return latencies


def test_a_non_streaming_request_is_aborted_when_its_client_leaves(pipeline: Pipeline) -> None:
    assert wait_until(lambda: idle(pipeline), 30), pipeline.stats()
    before = pipeline.stats()["frontend"]["num_aborted"]
    steps_before = num_steps(pipeline)
    body = chat("Hello!", max_tokens=900, ignore_eos=True)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{pipeline.url}/v1/chat/completions", json=body, timeout=1.0)
    assert wait_until(lambda: pipeline.stats()["frontend"]["num_aborted"] > before, 10), pipeline.stats()
    assert wait_until(lambda: idle(pipeline), 10), pipeline.stats()
    assert num_steps(pipeline) - steps_before < 900, "aborted, not run to its 900 tokens (a step each)"


def num_steps(p: Pipeline) -> int:
    return sum(w["num_steps"] for w in p.stats()["scheduler"]["workers"])
