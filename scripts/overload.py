"""Overload a pipeline's frontend and report how it answered: fast 429s, none lost, memory bounded.

    python scripts/overload.py                                   # 2,000 requests, 200 at a time
    python scripts/overload.py --concurrency 2000                # all at once
    python scripts/overload.py --max-queued-requests 64 --max-tokens 32

It launches a pipeline on free ports (the embedded model unless ``--model``), sends
``--requests`` chat completions with at most ``--concurrency`` in flight, and prints one
JSON object: how many got 200, 429, another status or no answer (a client timeout);
latency percentiles of the 200s and of the 429s; the frontend's peak RSS (sampled every
50 ms, from /proc: Linux); and, once the traffic is over, whether any request or KV block is still held.
Other flags are ``PipelineConfig``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from typing import Any

import httpx

from modkit import Pipeline
from modkit.config import PipelineConfig

QUESTIONS = ["Hello!", "What does a cow say?", "Who are you?", "What color is the sky?"]


async def post(host: str, port: int, body: bytes) -> int:
    """One POST /v1/chat/completions on its own connection; the status code. A bare HTTP/1.1
    client: httpx's connection pool costs the client more than the server's answer does."""
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    await reader.read()  # the rest, up to the server's close
    writer.close()
    return status


async def send_all(url: str, model: str, total: int, concurrency: int, max_tokens: int) -> list[tuple[str, float]]:
    """(outcome, seconds) per request: the status code as text, or the exception's name."""
    address = httpx.URL(url)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> tuple[str, float]:
        question = QUESTIONS[i % len(QUESTIONS)]
        body = {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        async with gate:
            start = time.perf_counter()
            try:
                status = await asyncio.wait_for(post(address.host, address.port or 80, json.dumps(body).encode()), 120)
                outcome = str(status)
            except (OSError, TimeoutError, ValueError, IndexError) as err:
                outcome = type(err).__name__
            return outcome, time.perf_counter() - start

    return await asyncio.gather(*(one(i) for i in range(total)))


def rss_bytes(pid: int) -> int:
    """A process's resident memory, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("VmRSS:"))
    return int(kib) * 1024


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)
    pick = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
    ms = {name: round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1) for name, q in pick.items()}
    return {**ms, "max": round(values[-1] * 1000, 1)}


def held(p: Pipeline) -> dict[str, Any]:
    stats = p.stats()
    pool = stats["kv_cache_manager"]["pools"][0]
    return {
        "running": stats["scheduler"]["num_requests_running"],
        "waiting": stats["scheduler"]["num_requests_waiting"],
        "queued_in_frontend": stats["frontend"]["num_requests_queued"],
        "requests_holding_blocks": pool["num_requests_holding_blocks"],
        "kv_blocks_used": pool["kv_blocks_total"] - pool["kv_blocks_free"],
    }


def main(argv: list[str] | None = None) -> int:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--requests", type=int, default=2000)
    own.add_argument("--concurrency", type=int, default=200)
    own.add_argument("--max-tokens", type=int, default=16)
    options, rest = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    config = PipelineConfig.from_cli(rest)
    with Pipeline.launch(config, ports="auto", progress=False, record=False) as p:
        frontend = p.pids()["frontend"]
        peak = {"rss": rss_bytes(frontend)}
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak["rss"] = max(peak["rss"], rss_bytes(frontend))

        sampler = threading.Thread(target=sample, daemon=True)
        rss_before = peak["rss"]
        sampler.start()
        start = time.perf_counter()
        results = asyncio.run(send_all(p.url, p.model_name, options.requests, options.concurrency, options.max_tokens))
        elapsed = time.perf_counter() - start
        done.set()
        sampler.join()
        deadline = time.monotonic() + 30
        while any(held(p).values()) and time.monotonic() < deadline:
            time.sleep(0.2)  # polled: the state lives in other processes
        outcomes: dict[str, int] = {}
        for outcome, _ in results:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        report = {
            "requests": options.requests,
            "concurrency": options.concurrency,
            "max_queued_requests": config.max_queued_requests,
            "seconds": round(elapsed, 2),
            "outcomes": outcomes,
            "latency_200_ms": percentiles([s for o, s in results if o == "200"]),
            "latency_429_ms": percentiles([s for o, s in results if o == "429"]),
            "frontend_rss_mib": {"before": rss_before >> 20, "peak": peak["rss"] >> 20},
            "held_after": held(p),
            "frontend_stats": {k: v for k, v in p.stats()["frontend"].items() if k.startswith("num_")},
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
