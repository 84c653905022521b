"""``EngineClient`` for the six-process pipeline: requests out to the router, outputs in from the scheduler.

Everything runs on the server's asyncio event loop (one thread), so nothing here needs
a lock::

    generate():  tokens -> OutputProcessor.make_requests -> AddRequest --PUSH--> router
    receiver task:  frontend.in --EngineOutputs--> OutputProcessor.process (detokenize,
                    stop strings) -> each request's asyncio.Queue -> generate() yields

The frontend checks what it can before anything leaves (token ids within the
vocabulary, a prompt that fits the context), so a bad request is a
400 without a round trip; the scheduler's own refusals come back as ``RequestRejected``.
A stop string is found here, on the text: the frontend then tells the scheduler to
finish the request (``AbortRequest(reason="stop")``), as vLLM's API server does.

Restarts of the parts behind it: ``resubmit`` (the launcher calls it after a router or
scheduler restart) sends every request in flight again, with the tokens it has received so
far (the scheduler ignores those it still has, and carries the others on from there), and the
aborts of the last ``RESEND_ABORTS_S`` (lost with the router's inbox, they would leave the
scheduler computing for nobody). Outputs for a request this frontend does not follow (it
finished here, or belongs to a frontend that was restarted) get one ``AbortRequest``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from modkit.engine.async_engine import EngineDeadError
from modkit.engine.output_processor import CompletionDelta, OutputProcessor
from modkit.model.config import ModelConfig
from modkit.pipeline.addresses import PipelineAddresses
from modkit.protocol import AbortRequest, AddRequest, EngineOutputs, RequestRejected
from modkit.request import check_prompt
from modkit.sampling_params import SamplingParams
from modkit.scheduler.output import EngineCoreOutput
from modkit.trace.events import EventPublisher, RequestArrived, RequestDone, TokensOut
from modkit.transport import AsyncInbox, Outbox, RpcClient, RpcTimeoutError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
RESEND_ABORTS_S = 60.0  # aborts sent this recently are sent again by resubmit()
MAX_ABORTED = 10_000  # aborted req_ids remembered, so that late outputs for one get no second abort
RESUBMIT_TIMEOUT_S = 10.0
ENGINE_STATS_TIMEOUT_S = 2.0  # a scrape of /metrics waits this long for the scheduler and the KV cache manager
ROUTER_HEALTH_TIMEOUT_S = 1.0  # /health waits this long for the router's own
READINESS_REUSED_S = 0.5  # the router's answer serves the /health calls of this long (a launch polls ten a second)


@dataclass(slots=True)
class _Stream:
    queue: asyncio.Queue[CompletionDelta | BaseException]
    req_ids: list[str]  # the engine requests (n of them) behind this request id
    # Not streamed: deltas wait here until a completion finishes, so the request's coroutine
    # wakes once per completion instead of once per step (with many requests, per-token
    # wake-ups can keep the frontend's event loop busier than anything else in the pipeline).
    held: list[CompletionDelta] | None = None


class PipelineClient:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model_config: ModelConfig,
        max_model_len: int,
        addresses: PipelineAddresses,
        allow_remote: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.model_config = model_config
        self._max_model_len = max_model_len
        self.processor = OutputProcessor(tokenizer)
        self.error: BaseException | None = None
        self.draining = False  # set by drain(): new requests are refused with 503, those in flight finish
        self.down_components: list[str] = []  # set by the launcher's supervisor: /health says "degraded"
        self.addresses = addresses
        self.inbox = AsyncInbox(addresses.inbox("frontend"), allow_remote=allow_remote)
        self.to_router = Outbox(addresses.inbox("router"))
        self.events = EventPublisher("frontend", addresses.events("frontend"), allow_remote)
        self._streams: dict[str, _Stream] = {}  # request id -> its stream
        self._owner: dict[str, str] = {}  # engine req_id -> request id
        self._adds: dict[str, AddRequest] = {}  # engine req_id -> the AddRequest sent for it, while in flight
        self._aborted: dict[str, float] = {}  # engine req_id -> when an abort was sent for it, oldest first
        self._receiver: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.step_observers: list[Callable[[list[CompletionDelta]], None]] = []  # each step's deltas (/metrics)
        self.num_requests = 0
        self.num_finished = 0
        self.num_aborted = 0
        self.num_rejected = 0
        self.num_orphans_aborted = 0  # requests this frontend does not follow whose outputs came: aborted
        self._readiness: tuple[float, tuple[str, str] | None] = (-float("inf"), None)  # (when asked, answer)

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"  # unique across frontend restarts too

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        stream: bool = True,
    ) -> AsyncIterator[CompletionDelta]:
        if self.error is not None:
            raise EngineDeadError(f"the frontend's output loop failed: {self.error!r}")
        if self.draining:
            raise EngineDeadError("the server is shutting down: it finishes the requests it has and takes no new ones")
        check_prompt(prompt_token_ids, params, self.model_config.vocab_size)  # a 400 without a round trip
        self._ensure_receiver()
        output, requests = self.processor.make_requests(request_id, prompt, prompt_token_ids, params)
        queue: asyncio.Queue[CompletionDelta | BaseException] = asyncio.Queue()
        self._streams[request_id] = _Stream(queue, [r.req_id for r in requests], None if stream else [])
        eos = tuple(self.model_config.eos_token_ids)
        for index, request in enumerate(requests):
            request.eos_token_ids = eos
            self.processor.track(output, index, request)
            self._owner[request.req_id] = request_id
            add = AddRequest(request.req_id, prompt_token_ids, request.sampling_params, eos, request.arrival_time)
            self._adds[request.req_id] = add
            self.to_router.send(add)
            arrived = RequestArrived(
                request.arrival_time,
                request.req_id,
                request_id,
                len(prompt_token_ids),
                params.max_tokens,
                prompt_token_ids,
                request.sampling_params,
            )
            self.events.publish("request", arrived)
        self.num_requests += 1
        remaining = params.n
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                remaining -= item.finish_reason is not None
                yield item
        finally:
            if remaining:
                self.abort(request_id)
            else:
                self.num_finished += 1

    def abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        self._forget(stream)
        self.num_aborted += 1
        self._send_abort(stream.req_ids)
        now = time.time()
        for req_id in stream.req_ids:
            self.events.publish("request", RequestDone(now, req_id, "abort"))

    def _forget(self, stream: _Stream) -> None:
        self.processor.forget(stream.req_ids)
        for req_id in stream.req_ids:
            self._owner.pop(req_id, None)
            self._adds.pop(req_id, None)

    def _send_abort(self, req_ids: list[str], reason: str = "abort") -> None:
        now = time.monotonic()
        for req_id in req_ids:
            self._aborted[req_id] = now
        while len(self._aborted) > MAX_ABORTED:
            del self._aborted[next(iter(self._aborted))]
        self.to_router.send(AbortRequest(req_ids, reason=reason))

    # -- after a restart behind the frontend ---------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Receive on ``loop`` (the server's) from now on, before any request: outputs for requests of a
        frontend that was restarted get their abort. Called from another thread."""
        self._loop = loop
        asyncio.run_coroutine_threadsafe(self._start(), loop).result(RESUBMIT_TIMEOUT_S)

    async def _start(self) -> None:
        self._ensure_receiver()

    def resubmit(self) -> dict[str, int]:
        """Send every request in flight again, and the recent aborts (see the module docstring); from any thread."""
        if self._loop is None:
            return {"requests": 0, "aborts": 0}
        future: Future[dict[str, int]] = asyncio.run_coroutine_threadsafe(self._resubmit(), self._loop)
        return future.result(RESUBMIT_TIMEOUT_S)

    async def _resubmit(self) -> dict[str, int]:
        # NOTE: the old scheduler's last outputs were received before this runs (the launcher calls it
        # once the new one is up, seconds later), so "so far" is all this frontend will ever get from it.
        since = time.monotonic() - RESEND_ABORTS_S
        aborts = [req_id for req_id, at in self._aborted.items() if at >= since]
        if aborts:
            self.to_router.send(AbortRequest(aborts))
        num_requests = 0
        for req_id, add in list(self._adds.items()):
            if self.processor.is_tracked(req_id):
                outputs = self.processor.output_token_ids(req_id)
                self.to_router.send(msgspec.structs.replace(add, output_token_ids=outputs))
                num_requests += 1
        return {"requests": num_requests, "aborts": len(aborts)}

    # -- the receiver task ------------------------------------------------------------------

    def _ensure_receiver(self) -> None:
        if self._receiver is None or self._receiver.done():
            self._loop = asyncio.get_running_loop()
            self._receiver = self._loop.create_task(self._receive())

    async def _receive(self) -> None:
        try:
            while True:
                message = await self.inbox.recv()
                if isinstance(message, EngineOutputs):
                    self._on_outputs(message)
                elif isinstance(message, RequestRejected):
                    self._on_rejected(message)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # fail every waiting request rather than let one hang
            log.exception("frontend output loop failed")
            self.error = error
            for stream in list(self._streams.values()):
                stream.queue.put_nowait(EngineDeadError(f"the frontend's output loop failed: {error!r}"))

    def _on_outputs(self, message: EngineOutputs) -> None:
        tracked = [o for o in message.outputs if self.processor.is_tracked(o.req_id)]
        if len(tracked) < len(message.outputs):
            # Computed for nobody here (a client of a restarted frontend, an abort lost on the way): stopped once.
            unknown = [o.req_id for o in message.outputs if o.finish_reason is None and o.req_id not in self._aborted]
            unknown = [r for r in unknown if not self.processor.is_tracked(r)]
            if unknown:
                self.num_orphans_aborted += len(unknown)
                self._send_abort(unknown)
        step = self.processor.process(message.outputs)
        if step.stopped:
            self._send_abort(step.stopped, reason="stop")
        self._publish_outputs(tracked, step.stopped)
        for observe in self.step_observers:
            observe(step.deltas)
        for delta in step.deltas:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue
            if stream.held is None:
                stream.queue.put_nowait(delta)
            elif delta.finish_reason is None:
                stream.held.append(delta)
            else:  # one wake-up: a getter takes the rest without waiting
                for held in [*stream.held, delta]:
                    stream.queue.put_nowait(held)
                stream.held.clear()
        for finished in step.finished:
            stream = self._streams.pop(finished.request_id, None)
            if stream is not None:
                for req_id in stream.req_ids:
                    self._owner.pop(req_id, None)
                    self._adds.pop(req_id, None)

    def _publish_outputs(self, outputs: list[EngineCoreOutput], stopped: list[str]) -> None:
        """When each token left the engine, and which requests it finished (for TTFT and inter-token latency)."""
        if not outputs or not self.events.wants("request"):
            return  # nobody listens: not even built
        now = time.time()
        self.events.publish("request", TokensOut(now, {o.req_id: len(o.new_token_ids) for o in outputs}))
        finished = {o.req_id: o.finish_reason for o in outputs if o.finish_reason is not None}
        finished.update(dict.fromkeys(stopped, "stop"))
        for req_id, reason in finished.items():
            self.events.publish("request", RequestDone(now, req_id, reason))

    def _on_rejected(self, message: RequestRejected) -> None:
        request_id = self._owner.get(message.req_id)
        stream = self._streams.pop(request_id, None) if request_id is not None else None
        if stream is None:
            return
        self.num_rejected += 1
        self._forget(stream)
        now = time.time()
        for req_id in stream.req_ids:
            reason = "rejected" if message.kind == "invalid" else "error"
            self.events.publish("request", RequestDone(now, req_id, reason, message.message))
        others = [r for r in stream.req_ids if r != message.req_id]
        if others:  # the other completions of an n > 1 request are of no use alone
            self._send_abort(others)
        error: Exception = (
            ValueError(message.message) if message.kind == "invalid" else EngineDeadError(message.message)
        )
        stream.queue.put_nowait(error)

    def stats(self) -> dict[str, int]:
        return {
            "num_requests": self.num_requests,
            "num_requests_in_flight": len(self._streams),
            "num_finished": self.num_finished,
            "num_aborted": self.num_aborted,
            "num_rejected": self.num_rejected,
            "num_orphans_aborted": self.num_orphans_aborted,
        }

    async def not_ready(self) -> tuple[str, str] | None:
        """None if a request sent now can be served; else (status, why) for ``/health``. The router
        decides: it serves once a worker has sent it a heartbeat, so a frontend up before the workers
        (a model still loading, components started in any order) says "starting" rather than ok."""
        asked, answer = self._readiness
        if time.monotonic() - asked > READINESS_REUSED_S:
            answer = await asyncio.to_thread(self._ask_router)
            self._readiness = (time.monotonic(), answer)
        return answer

    def _ask_router(self) -> tuple[str, str] | None:
        try:
            with RpcClient(self.addresses.rpc("router"), ROUTER_HEALTH_TIMEOUT_S) as rpc:
                health = rpc.call("health")
        except RpcTimeoutError:
            return "unavailable", f"the router did not answer within {ROUTER_HEALTH_TIMEOUT_S:g} s"
        if health["status"] == "ok":
            return None
        status = "starting" if health["status"] == "starting" else "unavailable"
        return status, f"router: {health.get('error', health['status'])}"

    def engine_stats(self) -> list[dict[str, float]]:
        """Each worker's counters: its scheduler's (running, waiting, preemptions, KV usage) from the
        scheduler process, its KV pool's prefix cache counts from the KV cache manager's. Blocks: call
        it on a thread. An empty list if either does not answer in time."""
        try:
            with RpcClient(self.addresses.rpc("scheduler"), ENGINE_STATS_TIMEOUT_S) as rpc:
                workers = rpc.call("stats")["workers"]
            with RpcClient(self.addresses.rpc("kv_cache_manager"), ENGINE_STATS_TIMEOUT_S) as rpc:
                pools = rpc.call("stats")["pools"]
        except RpcTimeoutError:
            log.warning("the scheduler or the KV cache manager did not answer a /metrics scrape in time")
            return []
        return [
            {
                "num_requests_running": worker["num_requests_running"],
                "num_requests_waiting": worker["num_requests_waiting"],
                "num_preemptions": worker["num_preemptions"],
                "kv_cache_usage": worker["kv_cache_usage"],
                "prefix_cache_queries": pool["prefix_cache_queries"],
                "prefix_cache_hits": pool["prefix_cache_hits"],
            }
            for worker, pool in zip(workers, pools, strict=False)
        ]

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
        self.inbox.close()
        self.to_router.close()
        self.events.close()
