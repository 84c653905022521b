"""The engine on a background thread, for asyncio callers such as the OpenAI server.

One thread owns the ``EngineCore`` and the ``OutputProcessor`` and runs the step loop;
nothing else touches them. Callers hand it closures through a command queue (add a
request, abort one) and receive each completion's deltas on an ``asyncio.Queue`` of
their own event loop. While no request is in flight the thread sleeps on the queue.

If a step raises, every in-flight request receives the error (none hangs), the engine
is marked dead (``error`` is set, so ``/health`` answers 503), and new requests are refused.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from modkit.engine.config import EngineConfig
from modkit.engine.core import EngineCore, RequestNeverFits
from modkit.engine.output_processor import CompletionDelta, OutputProcessor
from modkit.model import load_tokenizer
from modkit.request import RequestStatus
from modkit.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can be served until it is restarted."""


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[CompletionDelta | BaseException]
    req_ids: list[str]  # the engine requests (n of them) behind this request id


class AsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.core = EngineCore(config)
        self.tokenizer = load_tokenizer(config.model)
        self.processor = OutputProcessor(self.tokenizer)
        self.error: BaseException | None = None
        self.draining = False  # the one-process server stops at once; kept for the EngineClient interface
        self._ids = itertools.count()
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        # Called with each step's deltas on the engine thread (the server's /metrics times them).
        self.step_observers: list[Callable[[list[CompletionDelta]], None]] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="modkit-engine", daemon=True)
        self._thread.start()

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        stream: bool = True,
    ) -> AsyncIterator[CompletionDelta]:
        """Deltas of every completion of this request, as the engine produces them.

        Leaving the iteration early (a client that disconnects, a cancelled task) aborts
        the request in the engine, which frees its blocks. ``stream`` changes nothing here:
        deltas cross threads, not processes.
        """
        if self.error is not None:
            raise EngineDeadError(f"the engine failed: {self.error!r}")
        entry = _Stream(asyncio.get_running_loop(), asyncio.Queue(), [])
        accepted: concurrent.futures.Future[None] = concurrent.futures.Future()

        def add() -> None:
            output, requests = self.processor.make_requests(request_id, prompt, prompt_token_ids, params)
            try:
                for index, request in enumerate(requests):
                    self.core.add_request(request)
                    self.processor.track(output, index, request)
                    entry.req_ids.append(request.req_id)
            except Exception as err:  # a bad request: undo what was added, tell the caller
                self._abort_now(entry.req_ids)
                accepted.set_exception(err)
                return
            self._streams[request_id] = entry
            accepted.set_result(None)

        self._commands.put(add)
        await asyncio.wrap_future(accepted)
        remaining = params.n
        try:
            while remaining:
                item = await entry.queue.get()
                if isinstance(item, BaseException):
                    raise item
                remaining -= item.finish_reason is not None
                yield item
        finally:
            if remaining:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks (safe from any thread, for unknown ids too)."""

        def abort() -> None:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self._abort_now(stream.req_ids)

        self._commands.put(abort)

    async def not_ready(self) -> tuple[str, str] | None:
        """Always ready: the engine is built (its model loaded) before the server takes a request."""
        return None

    def stats(self) -> dict[str, float]:
        return self.core.stats()

    def engine_stats(self) -> list[dict[str, float]]:
        """One engine: ``stats()`` has every counter the server's ``/metrics`` reads."""
        return [self.core.stats()]

    def shutdown(self) -> None:
        self._stopping.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout=10)

    # -- the engine thread ------------------------------------------------------------------

    def _abort_now(self, req_ids: list[str]) -> None:
        self.core.abort_requests(req_ids)
        self.processor.forget(req_ids)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            idle = self.error is not None or not self.core.has_unfinished_requests()
            try:
                if idle:
                    self._commands.get()()  # sleep until there is something to do
                while True:
                    self._commands.get_nowait()()
            except queue.Empty:
                pass
            if self._stopping.is_set() or self.error is not None or not self.core.has_unfinished_requests():
                continue
            try:
                step = self.processor.process(self.core.step())
            except RequestNeverFits as err:  # aborted in the engine: only its caller gets the error
                self._fail_request(err.req_id, err)
                continue
            except Exception as err:  # any failure: fail every request rather than let one hang
                logger.exception("engine step failed")
                self._fail_all(err)
                continue
            if step.stopped:
                self.core.abort_requests(step.stopped, RequestStatus.FINISHED_STOPPED)
            for observe in self.step_observers:
                observe(step.deltas)
            for delta in step.deltas:
                stream = self._streams.get(delta.request_id)
                if stream is not None:
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, delta)
            for finished in step.finished:
                self._streams.pop(finished.request_id, None)

    def _fail_request(self, req_id: str, err: BaseException) -> None:
        """Fail the caller whose request has engine request ``req_id`` (its ``n`` siblings aborted too)."""
        for request_id, stream in list(self._streams.items()):
            if req_id in stream.req_ids:
                self._abort_now(stream.req_ids)
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, err)
                del self._streams[request_id]

    def _fail_all(self, err: BaseException) -> None:
        self.error = err
        dead = EngineDeadError(f"the engine failed: {err!r}")
        for request_id, stream in list(self._streams.items()):
            self._abort_now(stream.req_ids)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, dead)
            del self._streams[request_id]
