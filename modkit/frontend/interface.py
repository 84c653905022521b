"""What the OpenAI server needs from an engine; two implementations, one per transport.

- ``modkit.engine.AsyncEngine``: the engine on a thread of this process (``python -m modkit.frontend``).
- ``modkit.frontend.pipeline_client.PipelineClient``: the six-process pipeline, over ZeroMQ.

``generate`` yields the deltas of a request's completions as they are produced; it
raises ``ValueError`` (or ``SamplingParamsError``) for a request the engine refuses,
which the app answers with a 400, and ``EngineDeadError`` when nothing can serve it (503).
Leaving the iteration early aborts the request, which frees its KV blocks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from modkit.engine.output_processor import CompletionDelta
from modkit.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class EngineClient(Protocol):
    tokenizer: PreTrainedTokenizerBase
    error: BaseException | None  # set once the engine can serve nothing (/health answers 503)
    draining: bool  # shutting down: new requests get 503, those in flight finish
    # Each is called with every engine step's deltas, as the engine makes them (on any thread).
    step_observers: list[Callable[[list[CompletionDelta]], None]]

    @property
    def max_model_len(self) -> int: ...

    def new_request_id(self, prefix: str) -> str: ...

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        stream: bool = True,
    ) -> AsyncIterator[CompletionDelta]:
        """Deltas of every completion as the engine makes them. ``stream=False``: the caller wants
        only the whole completion, so an engine may hold the deltas back until it finishes."""
        ...

    def abort(self, request_id: str) -> None: ...

    async def not_ready(self) -> tuple[str, str] | None:
        """None if a request sent now can be served; else (status, why), which ``/health`` answers
        with a 503 (the pipeline's frontend is up before any worker it could send a request to)."""
        ...

    def stats(self) -> Mapping[str, float]:
        """Counters for ``/stats``, by name."""
        ...

    def engine_stats(self) -> Sequence[Mapping[str, float]]:
        """Each engine's (worker's) scheduler and KV cache counters, by its index, for ``/metrics``:
        ``num_requests_running``, ``num_requests_waiting``, ``kv_cache_usage``,
        ``prefix_cache_queries``, ``prefix_cache_hits``, ``num_preemptions``. May block (the
        pipeline asks other processes): call it on a thread."""
        ...
