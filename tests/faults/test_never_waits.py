"""No request can wait for ever (issue 19, item 8 of what broke).

A KV cache smaller than ``max_model_len`` let a request in that the whole cache could not
hold: first in line, it was never admitted, every request behind it waited, and the engine
stepped on empty steps at full speed. Now such a configuration is refused at start (a
``max_model_len`` the user set) or ``max_model_len`` is lowered to what the cache holds (the
model's default), a request that can never fit is refused (ValueError in-process, 400 over
HTTP), and a plan that shows a request can never run (nothing computed, or the request
preempting itself with the pool to itself) is not stepped on: the request is failed, and an
empty plan is never sent. Each promise is tested in-process and in the pipeline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from modkit import LLM, Pipeline, SamplingParams
from modkit.config import ConfigError
from modkit.engine.async_engine import AsyncEngine
from modkit.engine.config import EngineConfig
from modkit.frontend import EMBEDDED_MODEL_NAME
from modkit.frontend.app import build_app
from modkit.kvcache import KVCacheManager
from modkit.request import Request
from modkit.scheduler import Scheduler
from modkit.scheduler.step import waits_for_ever
from tests.waiting import wait_until

NUM_KV_BLOCKS = 14  # 13 blocks of 16 hold 208 tokens; the embedded model allows 1,024
CAPACITY = (NUM_KV_BLOCKS - 1) * 16
LONG_PROMPT = list(range(10, 10 + 300))  # longer than the whole cache
FAST_S = 10.0  # "at once": a refusal, not a request that waited for blocks
MAX_CPU_RATE = 0.2  # CPU seconds a second that a scheduler with nothing to do may spend


def test_explicit_max_model_len_beyond_the_kv_cache_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="max_model_len") as refused:
        LLM(num_kv_blocks=NUM_KV_BLOCKS, max_model_len=512)
    assert "(512)" in str(refused.value) and f"({CAPACITY}:" in str(refused.value)
    assert "num_kv_blocks=33" in str(refused.value)  # what to change: 32 blocks of 16 (and block 0) hold 512
    LLM(num_kv_blocks=NUM_KV_BLOCKS, max_model_len=CAPACITY)  # exactly what the cache holds is fine


def test_default_max_model_len_is_lowered_to_the_kv_cache(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="modkit.engine.core"):
        llm = LLM(num_kv_blocks=NUM_KV_BLOCKS)
    assert llm.max_model_len == CAPACITY
    assert f"max_model_len lowered from the model's 1024 to {CAPACITY}" in caplog.text
    # A request up to the lowered length runs alone in the whole cache, to its end.
    out = llm.generate([list(range(10, 110))], SamplingParams(max_tokens=500, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == CAPACITY - 100
    assert out[0].outputs[0].finish_reason == "length"
    llm.engine.check_invariants()


@pytest.mark.timeout(120)  # it used to spin for ever
def test_a_prompt_longer_than_the_whole_cache_is_refused_at_once(tiny_model_dir: Path) -> None:
    """The issue's reproduction: it used to spin for ever, the long request first in line."""
    llm = LLM(num_kv_blocks=40)  # 39 blocks of 16: 624 tokens
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="limit is 624"):
        llm.generate([list(range(10, 10 + 700)), [1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)
    assert time.monotonic() - t0 < FAST_S
    assert llm.stats()["num_steps"] == 0 and not llm.engine.has_unfinished_requests()
    # Nothing of the refused call is left behind: the next one runs.
    assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)[0].outputs[0].token_ids) == 4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cached", [False, True], ids=["cold", "prefix_cached"])
def test_a_request_the_cache_cannot_hold_fails_instead_of_spinning(tiny_model_dir: Path, cached: bool) -> None:
    """The guard behind the length check: were a scheduler's max_model_len beyond its cache, as it was
    in the issue, the plan that shows it fails the request at once instead of being stepped for ever.
    Cold, the request is never admitted (empty steps); with its prefix cached it is admitted on the
    hit and preempts itself as it grows, step after step."""
    llm = LLM(num_kv_blocks=NUM_KV_BLOCKS, max_num_batched_tokens=64)
    if cached:
        llm.generate([LONG_PROMPT[: CAPACITY - 20]], SamplingParams(max_tokens=4), use_tqdm=False)
    assert isinstance(llm.engine.scheduler, Scheduler)
    llm.engine.scheduler.max_model_len = 1024  # the state the issue reported: the model's length, a small cache
    steps_before = llm.stats()["num_steps"]
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="does not fit in the whole KV cache"):
        llm.generate([LONG_PROMPT, [1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)
    assert time.monotonic() - t0 < FAST_S
    assert llm.stats()["num_steps"] - steps_before <= 4, "a few steps, not millions"
    assert not llm.engine.has_unfinished_requests()
    llm.engine.check_invariants()


def test_the_scheduler_names_the_request_an_empty_plan_leaves_waiting() -> None:
    scheduler = Scheduler(KVCacheManager(NUM_KV_BLOCKS, 16), max_model_len=1024)
    scheduler.add_request(Request("long", LONG_PROMPT, SamplingParams(max_tokens=4)))
    scheduler.add_request(Request("short", [1, 2, 3], SamplingParams(max_tokens=4)))
    plan = scheduler.schedule()
    assert plan.total_num_scheduled_tokens == 0
    stuck = waits_for_ever(scheduler, plan)
    assert stuck is not None and stuck.req_id == "long"


def test_chunked_prefill_and_one_seq_at_a_time_finish_every_request(tiny_model_dir: Path) -> None:
    """A prompt longer than a step's token budget is computed in chunks; max_num_seqs=1 runs one
    request at a time. Both give what a roomy engine gives (greedy)."""
    prompts = [list(range(10, 10 + 150)), list(range(20, 20 + 90))]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(num_kv_blocks=64).generate(prompts, params, use_tqdm=False)]
    cramped = LLM(num_kv_blocks=NUM_KV_BLOCKS + 4, max_num_batched_tokens=8, max_num_seqs=1)
    cramped.check_invariants_each_step = True
    got = [o.outputs[0].token_ids for o in cramped.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    assert cramped.stats()["num_steps"] >= (150 + 90) // 8


# -- the one-process server -------------------------------------------------------------


def test_one_process_server_serves_the_lowered_length(tiny_model_dir: Path) -> None:
    engine = AsyncEngine(EngineConfig(num_kv_blocks=NUM_KV_BLOCKS))
    try:
        with TestClient(build_app(engine, EMBEDDED_MODEL_NAME)) as http:
            models = http.get("/v1/models").json()
            assert models["data"][0]["max_model_len"] == CAPACITY
            check_refused(http.post("/v1/completions", json=completion(LONG_PROMPT)), "context_length_exceeded")
    finally:
        engine.shutdown()


@pytest.mark.timeout(120)
def test_async_engine_fails_only_the_request_that_never_fits(tiny_model_dir: Path) -> None:
    """The same guard in the server's engine: the request fails, the engine lives on and serves the rest."""
    engine = AsyncEngine(EngineConfig(num_kv_blocks=NUM_KV_BLOCKS))
    assert isinstance(engine.core.scheduler, Scheduler)
    engine.core.scheduler.max_model_len = 1024  # set before any request: the engine thread is asleep

    async def complete(request_id: str, prompt: list[int]) -> list[int]:
        deltas = engine.generate(request_id, prompt, SamplingParams(max_tokens=4, ignore_eos=True))
        return [t async for d in deltas for t in d.new_token_ids]

    async def both() -> tuple[BaseException | list[int], ...]:
        return tuple(
            await asyncio.gather(complete("long", LONG_PROMPT), complete("short", [1, 2, 3]), return_exceptions=True)
        )

    try:
        refused, served = asyncio.run(both())
        assert isinstance(refused, ValueError) and "does not fit in the whole KV cache" in str(refused)
        assert isinstance(served, list) and len(served) == 4
        assert engine.error is None
    finally:
        engine.shutdown()


# -- the pipeline -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Iterator[Pipeline]:
    with Pipeline.launch(ports="auto", num_kv_blocks=NUM_KV_BLOCKS, max_num_batched_tokens=64, progress=False) as p:
        yield p


def completion(prompt: list[int], **fields: object) -> dict[str, object]:
    return {"model": EMBEDDED_MODEL_NAME, "prompt": prompt, "temperature": 0, **fields}


def check_refused(response: httpx.Response, code: str | None) -> None:
    """A 400 in the OpenAI error shape."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == code


def test_pipeline_refuses_an_explicit_length_beyond_the_kv_cache_before_starting_anything(tiny_model_dir: Path) -> None:
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    with pytest.raises(ConfigError, match="max_model_len") as refused:
        Pipeline.launch(ports="auto", num_kv_blocks=NUM_KV_BLOCKS, max_model_len=512, progress=False)
    assert "(512)" in str(refused.value) and f"({CAPACITY}:" in str(refused.value)
    assert {c.pid for c in psutil.Process().children(recursive=True)} <= before, "a process was left running"


def test_pipeline_lowers_the_default_length_everywhere(pipeline: Pipeline) -> None:
    assert pipeline.max_model_len == CAPACITY
    models = httpx.get(f"{pipeline.url}/v1/models", timeout=10).json()
    assert models["data"][0]["max_model_len"] == CAPACITY  # the frontend took the lowered value
    # The scheduler did too: a request at the lowered length runs to it, alone in the whole pool.
    body = completion(list(range(10, 190)), max_tokens=CAPACITY - 180, ignore_eos=True)
    done = httpx.post(f"{pipeline.url}/v1/completions", json=body, timeout=120).json()
    assert done["usage"]["completion_tokens"] == CAPACITY - 180


def test_pipeline_refuses_what_can_never_fit_with_a_400(pipeline: Pipeline) -> None:
    """The issue's reproduction in the pipeline: a prompt longer than the whole cache, then one
    whose prompt and max_tokens together are."""
    t0 = time.monotonic()
    check_refused(
        httpx.post(f"{pipeline.url}/v1/completions", json=completion(LONG_PROMPT), timeout=120),
        "context_length_exceeded",
    )
    too_long = completion(list(range(10, 110)), max_tokens=CAPACITY)
    check_refused(httpx.post(f"{pipeline.url}/v1/completions", json=too_long, timeout=120), "context_length_exceeded")
    assert time.monotonic() - t0 < FAST_S
    assert_idle(pipeline)  # and nothing is left spinning


def test_pipeline_scheduler_steps_only_what_computes_while_a_request_waits_for_blocks(pipeline: Pipeline) -> None:
    """One request grows to fill the whole pool; another, admitted with it, would not fit beside
    it and waits for its blocks meanwhile. Every step the scheduler sends computes tokens: no
    empty step is sent while the second waits (the issue saw millions a minute)."""
    holder = completion(list(range(10, 160)), max_tokens=CAPACITY - 150, ignore_eos=True)  # 10 blocks, then all 13
    waiter = completion(list(range(300, 360)), max_tokens=8, ignore_eos=True)  # 4 blocks: not beside the holder
    scheduler = psutil.Process(pipeline.pids()["scheduler"])
    pipeline.hold_requests(True)  # both in line before the first step: the holder first
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{pipeline.url}/v1/completions", json=holder, timeout=120)
            assert wait_until(lambda: pipeline.hold_requests(True) == 1, 30)
            second = pool.submit(httpx.post, f"{pipeline.url}/v1/completions", json=waiter, timeout=120)
            assert wait_until(lambda: pipeline.hold_requests(True) == 2, 30)
            pipeline.clear_trace()
            t0, cpu0 = time.monotonic(), sum(scheduler.cpu_times()[:2])
            pipeline.hold_requests(False)
            assert first.result().status_code == 200 and second.result().status_code == 200
            rate = (sum(scheduler.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
    finally:
        pipeline.hold_requests(False)
    steps = pipeline.trace().steps
    waited = steps[steps["num_waiting"] == 1]
    assert len(waited) >= (CAPACITY - 150) // 2, "the second request waited for the first one's blocks"
    assert (steps["tokens_used"] > 0).all(), "a step that computed nothing was sent"
    assert rate < MAX_CPU_RATE, f"scheduler CPU {rate:.2f} s/s over {len(steps)} steps"


def scheduler_stats(pipeline: Pipeline) -> dict[str, Any]:
    return httpx.get(pipeline.urls()["scheduler"].removesuffix("/health") + "/stats", timeout=10).json()


def assert_idle(pipeline: Pipeline, window_s: float = 1.0) -> None:
    """With every request answered, the scheduler steps nothing and spends (almost) no CPU over ``window_s``."""
    num_steps = scheduler_stats(pipeline)["workers"][0]["num_steps"]
    rate = cpu_rate(pipeline.pids()["scheduler"], window_s)
    assert scheduler_stats(pipeline)["workers"][0]["num_steps"] == num_steps, "the scheduler steps with nothing to do"
    assert rate < MAX_CPU_RATE, f"the scheduler spends {rate:.2f} CPU s/s with nothing to do"


def cpu_rate(pid: int, window_s: float) -> float:
    """CPU seconds (user + system) that process ``pid`` spends per second of wall time, over ``window_s``."""
    process = psutil.Process(pid)
    t0, cpu0 = time.monotonic(), sum(process.cpu_times()[:2])
    time.sleep(window_s)  # a measuring window, not a wait for something to happen
    return (sum(process.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)


def test_pipeline_scheduler_refuses_a_request_it_can_never_schedule(pipeline: Pipeline) -> None:
    """The guard behind the length check, end to end: the scheduler and frontend restarted with the
    model's length over the small pool (the state the issue reported). The long prompt now reaches
    the scheduler; its empty plan is not sent, the request is refused (400), and the short one
    queued behind it is served. Then the launcher's fit for a pool sized from free memory
    (``_fit_to_kv_pools``) lowers the length again, restarting both with the lowered value."""
    for name in ("scheduler", "frontend"):
        pipeline.specs[name].kwargs["max_model_len"] = pipeline.max_model_len = 1024
        pipeline.restart(name)
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(httpx.post, f"{pipeline.url}/v1/completions", json=completion(LONG_PROMPT), timeout=120)
        short = pool.submit(
            httpx.post, f"{pipeline.url}/v1/completions", json=completion([1, 2, 3], max_tokens=4), timeout=120
        )
        refused = long.result()
        assert short.result().status_code == 200
    check_refused(refused, code=None)
    assert "does not fit in the whole KV cache" in refused.json()["error"]["message"]
    assert_idle(pipeline)
    assert scheduler_stats(pipeline)["num_rejected"] == 1

    pipeline._fit_to_kv_pools(NUM_KV_BLOCKS, lambda _: None)
    assert pipeline.max_model_len == CAPACITY
    assert httpx.get(f"{pipeline.url}/v1/models", timeout=10).json()["data"][0]["max_model_len"] == CAPACITY
    check_refused(
        httpx.post(f"{pipeline.url}/v1/completions", json=completion(LONG_PROMPT), timeout=120),
        "context_length_exceeded",
    )
