"""An open-loop load generator for the OpenAI API, as vLLM's ``benchmark_serving`` measures one.

*Open loop*: requests arrive on a schedule of their own (a Poisson process at ``rate``
requests per second: exponential gaps, the same seeded pattern at every rate; ``inf`` sends
them all at once), whether or not the server keeps up. A closed loop (a fixed number of
clients, each waiting for its reply) would slow its own arrivals down as the server slows,
and hide the queue that builds when the offered rate passes what the server can do.

Each request is a streamed completion, greedy, with ``ignore_eos`` (so it makes exactly
``max_tokens`` tokens, counted from ``usage``). Per request:

- TTFT: from sending it to its first streamed chunk that carries a choice.
- ITL (inter-token latency): the gaps between successive such chunks (a chunk of several
  tokens counts as one gap, as in vLLM).
- TPOT: (E2E - TTFT) / (output tokens - 1).
- E2E: from sending it to the end of its stream.

``summarize`` makes one row per rate in vLLM's names (``output_throughput``,
``median_ttft_ms``, ``p99_itl_ms`` ...); ``knee`` finds where throughput stopped following
the offered rate. ``scripts/benchmark_online.py`` and notebook 07 both use this module.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import openai

Prompt = str | list[int]  # text, or token ids


@dataclass(slots=True)
class RequestResult:
    """One streamed request; times in seconds from the run's start or the request's send."""

    sent_s: float  # when it was sent, from the run's start
    ttft_s: float
    e2e_s: float
    output_tokens: int  # usage.completion_tokens
    num_chunks: int  # chunks that carried a choice
    itl_s: list[float] = field(default_factory=list)  # num_chunks - 1 gaps

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def poisson_send_times(n: int, rate: float, seed: int = 0) -> list[float]:
    """When each of ``n`` requests is sent, in seconds from the start: exponential gaps of mean
    ``1 / rate`` (the first at 0), the same pattern for one seed at every rate; all 0 for ``inf``."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if not math.isfinite(rate):
        return [0.0] * n
    gaps = random.Random(seed)
    times, at = [], 0.0
    for _ in range(n):
        times.append(at)
        at += gaps.expovariate(rate)
    return times


async def send_one(
    client: openai.AsyncOpenAI, model: str, prompt: Prompt, max_tokens: int, run_start: float
) -> RequestResult:
    """Stream one completion and time its chunks."""
    sent = time.perf_counter()
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    first: float | None = None
    last, itl, num_chunks, tokens = sent, [], 0, 0
    async for chunk in stream:
        if chunk.choices:  # the tokens of one step; the last chunk (usage) has no choice
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                itl.append(now - last)
            last, num_chunks = now, num_chunks + 1
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    done = time.perf_counter()
    assert first is not None, "the stream ended without a token"
    return RequestResult(sent - run_start, first - sent, done - sent, tokens, num_chunks, itl)


async def run_rate(
    client: openai.AsyncOpenAI, model: str, prompts: Sequence[Prompt], rate: float, max_tokens: int, seed: int = 0
) -> tuple[list[RequestResult], float]:
    """Send ``prompts`` as Poisson arrivals at ``rate`` requests/s (``inf``: all at once); results and wall seconds
    (first send to the last stream's end)."""
    start = time.perf_counter()
    tasks = []
    for prompt, send_at in zip(prompts, poisson_send_times(len(prompts), rate, seed), strict=True):
        delay = start + send_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send_one(client, model, prompt, max_tokens, start)))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def open_loop(
    base_url: str, model: str, prompts: Sequence[Prompt], rate: float, max_tokens: int, seed: int = 0
) -> tuple[list[RequestResult], float]:
    """``run_rate`` from synchronous code, also where an event loop already runs (a Jupyter kernel):
    on a fresh loop in a thread of its own, with a client of its own (``base_url`` ends in ``/v1``)."""

    async def run() -> tuple[list[RequestResult], float]:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="modkit", max_retries=0) as client:
            return await run_rate(client, model, prompts, rate, max_tokens, seed)

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(run())
        except BaseException as error:  # handed to the caller's thread
            box["error"] = error

    thread = threading.Thread(target=target, name="modkit-loadgen")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    result: tuple[list[RequestResult], float] = box["result"]
    return result


def rate_label(rate: float | str) -> str:
    return f"{rate:g}" if isinstance(rate, float | int) else rate


def stats_ms(name: str, seconds: list[float]) -> dict[str, float | None]:
    """``mean_<name>_ms``, ``median_<name>_ms`` (p50) and ``p99_<name>_ms``, as vLLM names them (None when empty)."""
    if not seconds:
        return {f"{k}_{name}_ms": None for k in ("mean", "median", "p99")}
    ms = 1e3 * np.asarray(seconds)
    return {
        f"mean_{name}_ms": float(ms.mean()),
        f"median_{name}_ms": float(np.percentile(ms, 50)),
        f"p99_{name}_ms": float(np.percentile(ms, 99)),
    }


def summarize(rate: float, results: list[RequestResult], duration: float, cpu_s: float = 0.0) -> dict[str, Any]:
    """One rate's row: throughputs over ``duration``, latency percentiles, and every request
    (``client_cpu_share``: ``cpu_s``, this process's CPU seconds meanwhile, over ``duration``)."""
    tokens = sum(r.output_tokens for r in results)
    return {
        "request_rate": rate if math.isfinite(rate) else "inf",
        "completed": len(results),
        "duration_s": duration,
        "total_output_tokens": tokens,
        "request_throughput": len(results) / duration,
        "output_throughput": tokens / duration,
        "client_cpu_share": cpu_s / duration,
        **stats_ms("ttft", [r.ttft_s for r in results]),
        **stats_ms("itl", [gap for r in results for gap in r.itl_s]),
        **stats_ms("tpot", [t for r in results if (t := r.tpot_s) is not None]),
        **stats_ms("e2el", [r.e2e_s for r in results]),
        # Every request but its gaps (num_prompts x output_len floats would swamp the file).
        "requests": [{k: v for k, v in asdict(r).items() if k != "itl_s"} for r in results],
    }


def knee(rows: Sequence[dict[str, Any]], keep_up: float = 0.8) -> float | None:
    """The knee of throughput against offered rate, in requests/s: the most the server completed
    at any rate, where the line "throughput = offered rate" meets the plateau. Below it the
    server keeps up; above it only its queue grows. None if it kept up (completed at least
    ``keep_up`` of the offered rate) at every rate of ``rows`` (``summarize``'s rows), or no rows.
    """

    def kept_up(row: dict[str, Any]) -> bool:  # "inf" never does: it is all the server can take
        return row["request_rate"] != "inf" and row["request_throughput"] >= keep_up * row["request_rate"]

    if all(kept_up(r) for r in rows):
        return None
    return float(max(r["request_throughput"] for r in rows))
