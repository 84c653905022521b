"""``/metrics``: the serving metrics in Prometheus text, with vLLM's names, types and buckets.

A dashboard or alert written for vLLM's OpenAI server reads these unchanged:

=====================================  =========  ===========================================
metric                                 type       what
=====================================  =========  ===========================================
vllm:num_requests_running              gauge      requests in the engine's running batch
vllm:num_requests_waiting              gauge      requests waiting to be scheduled
vllm:kv_cache_usage_perc               gauge      KV blocks in use, 1 = all of them
vllm:prefix_cache_queries              counter    prompt tokens looked up in the prefix cache
vllm:prefix_cache_hits                 counter    of those, tokens found cached
vllm:num_preemptions                   counter    requests preempted (their blocks taken back)
vllm:prompt_tokens                     counter    prompt tokens of the requests served
vllm:generation_tokens                 counter    tokens generated
vllm:time_to_first_token_seconds       histogram  arrival to the first token
vllm:inter_token_latency_seconds       histogram  between one step's tokens and the next's
vllm:e2e_request_latency_seconds       histogram  arrival to the last token
=====================================  =========  ===========================================

Every metric carries ``model_name``; those of the scheduler and the KV cache also carry
``engine`` (the worker's index), as vLLM labels each engine core of a data-parallel
server. They are read when Prometheus scrapes (``EngineState``, from wherever the engine
keeps them); the token counts and latencies are measured here, from the deltas each engine
step produces (``on_step``) for the requests the app submitted (``track``). vLLM takes its
times inside the engine; these include the hop from the engine to the frontend, which is
what a client sees.

Each app has a registry of its own (not prometheus_client's global one), so that several
servers in one process (tests, a notebook) keep their counts apart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from modkit.engine.output_processor import CompletionDelta
from modkit.transport.prometheus import stats_metrics

# vLLM's default buckets (vllm/v1/metrics/buckets.py), so that quantiles compare.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
TTFT_BUCKETS += [20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
ITL_BUCKETS += [20.0, 40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0]
E2E_BUCKETS += [480.0, 960.0, 1920.0, 7680.0]


@dataclass(frozen=True, slots=True)
class EngineState:
    """One engine's scheduler and KV cache counters at scrape time (vLLM's ``SchedulerStats``)."""

    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage: float  # 0 to 1
    prefix_cache_queries: int  # tokens, since start
    prefix_cache_hits: int
    num_preemptions: int

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any]) -> EngineState:
        """From ``EngineCore.stats()``, which has these keys."""
        return cls(**{name: stats[name] for name in cls.__slots__})


EngineStates = Callable[[], list[EngineState]]  # by engine index

# (type, name after "vllm:", vLLM's help text), read from each EngineState at a scrape.
ENGINE_METRICS = [
    ("gauge", "num_requests_running", "Number of requests in model execution batches."),
    ("gauge", "num_requests_waiting", "Number of requests waiting to be processed."),
    ("gauge", "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
    ("counter", "prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."),
    ("counter", "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
    ("counter", "num_preemptions", "Cumulative number of preemption from the engine."),
]


MAX_PENDING = 100_000  # inter-token times noted before on_step flushes them itself


@dataclass(slots=True)
class _Pending:
    """Times noted by ``on_step`` since the last ``flush``, in seconds."""

    generation_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)


@dataclass(slots=True)
class _Timing:
    arrival: float
    last_token: dict[int, float] = field(default_factory=dict)  # completion index -> when its last tokens came


class ServingMetrics:
    """The registry behind one app's ``/metrics``."""

    def __init__(
        self, model_name: str, engine_states: EngineStates, counters: Callable[[], Mapping[str, Any]] | None = None
    ) -> None:
        self.registry = r = CollectorRegistry()
        name = ["model_name"]
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", name, registry=r
        ).labels(model_name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", name, registry=r
        ).labels(model_name)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            name,
            buckets=TTFT_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            name,
            buckets=ITL_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            name,
            buckets=E2E_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.registry.register(_EngineCollector(model_name, engine_states, counters))
        self._timings: dict[str, _Timing] = {}
        self._lock = threading.Lock()  # on_step may run on the engine's thread (AsyncEngine)
        self._pending = _Pending()

    async def track(
        self, request_id: str, prompt_len: int, n: int, deltas: AsyncIterator[CompletionDelta]
    ) -> AsyncIterator[CompletionDelta]:
        """``deltas``, unchanged; while they last, ``on_step`` times this request."""
        with self._lock:
            self._timings[request_id] = _Timing(time.monotonic())
        self.prompt_tokens.inc(prompt_len * n)  # each of the n completions is an engine request, as in vLLM
        try:
            async for delta in deltas:
                yield delta
        finally:
            with self._lock:
                self._timings.pop(request_id, None)
            close = getattr(deltas, "aclose", None)
            if close is not None:  # now, not when collected: closing the engine's stream aborts the request
                await close()

    def on_step(self, deltas: Iterable[CompletionDelta]) -> None:
        """An engine step's deltas, as the engine made them (not as a client reads them).

        NOTE: this runs every step, on the engine's thread in the one-process server, so it only
        notes the times; ``flush`` (at a scrape) puts them in the histograms, where each
        ``observe`` takes a lock and a bisection: a step of hundreds of requests would pay that
        hundreds of times."""
        now = time.monotonic()
        pending = self._pending
        with self._lock:
            for delta in deltas:
                timing = self._timings.get(delta.request_id)
                if timing is None:
                    continue
                if delta.new_token_ids:
                    pending.generation_tokens += len(delta.new_token_ids)
                    last = timing.last_token.get(delta.index)
                    if last is None:
                        pending.ttft.append(now - timing.arrival)
                    else:
                        pending.itl.append(now - last)
                    timing.last_token[delta.index] = now
                if delta.finish_reason is not None:  # per completion: vLLM's n > 1 are n engine requests
                    pending.e2e.append(now - timing.arrival)
            full = len(pending.itl) > MAX_PENDING
        if full:  # nobody scrapes: flush here rather than keep every time
            self.flush()

    def flush(self) -> None:
        """Put the times noted since the last flush in the histograms and counters."""
        with self._lock:
            pending, self._pending = self._pending, _Pending()
        self.generation_tokens.inc(pending.generation_tokens)
        for histogram, values in ((self.ttft, pending.ttft), (self.itl, pending.itl), (self.e2e, pending.e2e)):
            for value in values:
                histogram.observe(value)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything in the registry."""
        self.flush()
        return bytes(generate_latest(self.registry))


class _EngineCollector:
    """The engine's gauges and counters, read from ``engine_states`` at each scrape, and the
    component's own counters (``/stats``) as ``modkit_*``."""

    def __init__(
        self, model_name: str, engine_states: EngineStates, counters: Callable[[], Mapping[str, Any]] | None
    ) -> None:
        self.model_name, self.engine_states, self.counters = model_name, engine_states, counters

    def collect(self) -> Iterator[Metric]:
        states = self.engine_states()
        for kind, name, help_text in ENGINE_METRICS:
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            metric = family(f"vllm:{name}", help_text, labels=["model_name", "engine"])
            attribute = "kv_cache_usage" if name == "kv_cache_usage_perc" else name
            for engine, state in enumerate(states):
                metric.add_metric([self.model_name, str(engine)], float(getattr(state, attribute)))
            yield metric
        if self.counters is not None:
            yield from stats_metrics("frontend", self.counters())
