"""Clients that leave: cut streams do not disturb the others, and nothing stays held.

One pipeline serves every test of this file. A stream a client cuts is aborted: its
request leaves the scheduler and its KV blocks go back, while the streams beside it go on
to exactly the text each would have had alone (the in-process engine is the oracle; greedy
decoding in float32 gives a request the same tokens whatever runs beside it).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from waiting import wait_until

from modkit import LLM, Pipeline, SamplingParams
from modkit.frontend import EMBEDDED_MODEL_NAME

NUM_STREAMS, NUM_CUT = 100, 10
QUESTIONS = ["Hello!", "What does a cow say?", "Who are you?", "What color is the sky?", "Tell me a story."]


@pytest.fixture(scope="module")
def pipeline() -> Iterator[Pipeline]:
    with Pipeline.launch(ports="auto", num_kv_blocks=512, max_model_len=512, progress=False) as p:
        yield p


def holding(p: Pipeline) -> dict[str, int]:
    """What the engine still holds: requests in the scheduler, blocks and requests in the KV pools."""
    stats = p.stats()
    pools = stats["kv_cache_manager"]["pools"]
    return {
        "requests": stats["scheduler"]["num_requests_running"] + stats["scheduler"]["num_requests_waiting"],
        "blocks": sum(pool["kv_blocks_total"] - pool["kv_blocks_free"] for pool in pools),
        "requests_holding_blocks": sum(pool["num_requests_holding_blocks"] for pool in pools),
    }


def nothing_held(p: Pipeline) -> bool:
    return not any(holding(p).values())


def stream(
    url: str, question: str, max_tokens: int, cut_after: int | None, cut: threading.Event, ignore_eos: bool = False
) -> str:
    """One streamed chat; with ``cut_after``, the connection is closed after that many chunks."""
    body = {
        "model": EMBEDDED_MODEL_NAME,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": ignore_eos or cut_after is not None,  # a cut stream must still be running when it is cut
        "stream": True,
    }
    text = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for n, line in enumerate(response.iter_lines()):
            if cut_after is not None and n >= cut_after:
                cut.set()
                return "".join(text)  # leaving the block closes the connection mid-stream
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            text.append(chunk["choices"][0]["delta"].get("content") or "")
    return "".join(text)


def test_cut_streams_are_aborted_and_the_others_equal_solo_runs(pipeline: Pipeline) -> None:
    aborted_before = pipeline.stats()["frontend"]["num_aborted"]
    pipeline.clear_trace()
    cuts = {i * (NUM_STREAMS // NUM_CUT) for i in range(NUM_CUT)}  # spread among the others
    jobs = [
        (QUESTIONS[i % len(QUESTIONS)], 400 if i in cuts else 16 + i % 17, 4 if i in cuts else None)
        for i in range(NUM_STREAMS)
    ]
    events = [threading.Event() for _ in jobs]
    with ThreadPoolExecutor(NUM_STREAMS) as pool:
        texts = list(pool.map(lambda j: stream(pipeline.url, *j[1], events[j[0]]), enumerate(jobs)))
    assert all(events[i].is_set() for i in cuts)

    llm = LLM(num_kv_blocks=512, max_model_len=512)
    kept = [i for i in range(NUM_STREAMS) if i not in cuts]
    solo = [
        llm.chat(
            [[{"role": "user", "content": jobs[i][0]}]],
            SamplingParams(temperature=0, max_tokens=jobs[i][1]),
            use_tqdm=False,
        )[0]
        .outputs[0]
        .text
        for i in kept
    ]
    assert [texts[i] for i in kept] == solo

    assert wait_until(lambda: nothing_held(pipeline), 30), f"still held after the streams ended: {holding(pipeline)}"
    assert pipeline.stats()["frontend"]["num_aborted"] - aborted_before == NUM_CUT
    requests = pipeline.trace().requests
    aborted = requests[requests.finish_reason == "abort"]
    assert len(aborted) == NUM_CUT
    assert (aborted.num_output_tokens < 400).all(), "a cut stream ran to its end"


def test_a_drain_finishes_the_requests_in_flight_and_holds_nothing_after(pipeline: Pipeline) -> None:
    """Last in this file: a drained pipeline takes no new request."""
    cut = threading.Event()
    pipeline.clear_trace()
    with ThreadPoolExecutor(8) as pool:
        running = [pool.submit(stream, pipeline.url, q, 200, None, cut, True) for q in QUESTIONS + QUESTIONS[:3]]
        in_flight = lambda: pipeline.stats()["frontend"]["num_requests_in_flight"]  # noqa: E731
        assert wait_until(lambda: in_flight() == len(running), 30), "the requests did not all reach the frontend"
        assert pipeline.drain(timeout_s=120), "requests were still in flight when the drain gave up"
        refused = httpx.post(
            f"{pipeline.url}/v1/chat/completions",
            json={"model": EMBEDDED_MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=30,
        )
        texts = [job.result() for job in running]
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error"
    requests = pipeline.trace().requests
    assert len(texts) == len(requests) == 8
    assert (requests.finish_reason == "length").all() and (requests.num_output_tokens == 200).all(), requests
    assert not cut.is_set()
    assert wait_until(lambda: nothing_held(pipeline), 30), f"still held after the drain: {holding(pipeline)}"
