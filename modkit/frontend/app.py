"""The OpenAI-compatible HTTP API: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models`` (and ``/v1/models/{id}``), vLLM's ``/tokenize``, ``/detokenize`` and
``/version``, ``/metrics`` (Prometheus text with vLLM's names, ``metrics.py``), ``/health``
and ``/stats``.

The app talks to an engine through ``EngineClient`` (``interface.py``): ``generate`` (an
async stream of deltas) and ``abort``, in this process or across the pipeline; it
tokenizes (on a thread, so that a long prompt does not stall the event loop), validates,
and shapes responses. Every error is OpenAI-shaped,
``{"error": {"message", "type", "param", "code"}}``, whatever went wrong: 400 for a bad
request (a field out of its bounds, malformed JSON, a prompt too long for the context),
401 for a missing or wrong API key (``/health`` asks none), 404 for an unknown model or
route, 405 for a wrong method, 413 for a body over ``max_request_body_bytes``, 429 (with
``Retry-After``) once ``max_queued_requests`` requests wait for their first token, 503
when the engine has failed, and 500, logged, for a bug. A client that hangs up aborts its
request, streamed or not, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from modkit.config import PipelineConfig
from modkit.engine.async_engine import EngineDeadError
from modkit.engine.output_processor import CompletionDelta
from modkit.frontend.batch import Prompt, close_all, first_deltas, merged
from modkit.frontend.guards import (
    RETRY_AFTER_S,
    APIError,
    LimitRequestBody,
    QueueFull,
    RequestQueue,
    RequireAPIKey,
    ShedWhenFull,
    error_body,
)
from modkit.frontend.interface import EngineClient
from modkit.frontend.metrics import EngineState, ServingMetrics
from modkit.frontend.protocol import (
    MAX_PROMPTS,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
)
from modkit.frontend.shaping import Shaper, merge_full, usage_chunk
from modkit.frontend.tools import encode_chat_with_tools, template_message
from modkit.frontend.vllm_routes import vllm_routes
from modkit.sampling_params import SamplingParams, SamplingParamsError

log = logging.getLogger(__name__)
T = TypeVar("T")
UNSUPPORTED = "not supported by this server (refused rather than ignored)"
# How long the server keeps an idle HTTP/1.1 connection open. It must outlast the clients' own
# keep-alive: the openai client (httpx) reuses a pooled connection idle for up to 5 s, uvicorn's
# default closes one at 5 s, and a request sent on a connection the server is closing at that
# moment fails with a connection error (APIConnectionError) though the server is well.
KEEP_ALIVE_S = 65

# What /openapi.json documents for each /v1 route besides its 200.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "A bad request: a field out of its bounds, malformed JSON, a prompt too long for the context"),
        (401, "A missing or wrong API key"),
        (404, "An unknown model"),
        (413, "A body over max_request_body_bytes"),
        (429, "max_queued_requests requests already wait for their first token; see Retry-After"),
        (503, "The engine failed, or the server is shutting down"),
    )
}

# With "stream": true, the 200 is server-sent events: "data: <chunk JSON>" lines, then "data: [DONE]".
STREAMED_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    200: {
        "description": "The completion: JSON, or with stream=true a stream of server-sent events",
        "content": {
            "text/event-stream": {  # the schema of one event
                "schema": {
                    "type": "object",
                    "properties": {"data": {"type": "string", "description": "a chunk as JSON, or [DONE]"}},
                    "required": ["data"],
                }
            }
        },
    },
}


def _error(status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> Response:
    # ASCII JSON: a message that quotes the client's text (a lone surrogate, say) still encodes.
    return Response(json.dumps(body), status, headers, media_type="application/json")


def build_app(
    engine: EngineClient,
    model_name: str,
    api_key: str | None = None,
    *,
    max_request_body_bytes: int | None = None,
    max_queued_requests: int | None = None,
) -> FastAPI:
    """The OpenAI API over ``engine``; the limits default to ``PipelineConfig``'s."""
    defaults = PipelineConfig().frontend_limits()
    if max_request_body_bytes is None:
        max_request_body_bytes = defaults["max_request_body_bytes"]
    if max_queued_requests is None:
        max_queued_requests = defaults["max_queued_requests"]
    app = FastAPI(title="modkit", summary="OpenAI-compatible API over modkit's engine")
    started = time.time()
    queue = RequestQueue(max_queued_requests)

    def counters() -> dict[str, Any]:
        return {
            **engine.stats(),
            "num_requests_queued": queue.num_queued,
            "num_requests_refused_queue_full": queue.num_refused,
        }

    def engine_states() -> list[EngineState]:
        return [EngineState.from_stats(stats) for stats in engine.engine_stats()]

    metrics = ServingMetrics(model_name, engine_states, counters)
    engine.step_observers.append(metrics.on_step)
    # Added last, runs first: the key, then the body's size, then the queue, each before a
    # byte of the body is read.
    app.add_middleware(ShedWhenFull, queue=queue, paths=("/v1/chat/completions", "/v1/completions"))
    app.add_middleware(LimitRequestBody, max_bytes=max_request_body_bytes)
    if api_key is not None:
        app.add_middleware(RequireAPIKey, api_key=api_key)

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> Response:
        return _error(err.status, err.body())

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, err: QueueFull) -> Response:
        return _error(429, err.body(), {"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> Response:
        message, param = _validation_message(err.errors())
        return _error(400, APIError(400, message, param=param).body())

    @app.exception_handler(HTTPException)  # unknown route (404), wrong method (405), unreadable body, 413
    async def http_error(_: Request, err: HTTPException) -> Response:
        return _error(err.status_code, error_body(str(err.detail), "invalid_request_error"), err.headers)

    @app.exception_handler(Exception)  # a bug: logged by Starlette, answered in the same shape
    async def server_error(_: Request, err: Exception) -> Response:
        log.exception("unhandled error in the OpenAI API", exc_info=err)
        return _error(500, error_body(f"internal server error: {type(err).__name__}", "server_error"))

    @app.get("/health")
    async def health() -> JSONResponse:
        # Only the pipeline's engine has parts that can be down: its supervisor sets this list.
        down = list(getattr(engine, "down_components", []))
        ok = engine.error is None and not engine.draining and not down
        status = "error" if engine.error is not None else "draining" if engine.draining else "degraded"
        not_ready = await engine.not_ready() if ok else None  # nothing down, yet nothing behind it may serve
        if not_ready is not None:
            ok, (status, why) = False, not_ready
        body: dict[str, Any] = {
            "status": "ok" if ok else status,
            "component": "frontend",
            "implementation": type(engine).__name__,
            "pid": os.getpid(),
            "model": model_name,
            "uptime_s": round(time.time() - started, 3),
        }
        if engine.error is not None:
            body["error"] = repr(engine.error)
        elif not_ready is not None:
            body["error"] = why
        if down:
            body["down"] = down
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return counters()

    def model_card() -> dict[str, Any]:
        return {
            "id": model_name,
            "object": "model",
            "created": int(started),
            "owned_by": "modkit",
            "max_model_len": engine.max_model_len,
        }

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", responses=ERROR_RESPONSES)
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:  # None: the served model, as vLLM does
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves '{model_name}'",
                param="model",
                code="model_not_found",
            )

    app.include_router(vllm_routes(engine, metrics, check_model, ERROR_RESPONSES))

    def sampling_params(
        req: ChatCompletionRequest | CompletionRequest, prompt_len: int, prompt_param: str
    ) -> SamplingParams:
        room = engine.max_model_len - prompt_len
        if room < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {engine.max_model_len} tokens; the prompt has {prompt_len}.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        try:
            params = req.to_sampling_params(default_max_tokens=room)
        except SamplingParamsError as err:
            raise APIError(400, str(err), param=err.field) from err
        if params.max_tokens is not None and params.max_tokens > room:
            raise APIError(
                400,
                f"This model's maximum context length is {engine.max_model_len} tokens; you asked "
                f"for {prompt_len} prompt + {params.max_tokens} completion tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return params

    async def serve(
        req: ChatCompletionRequest | CompletionRequest,
        kind: str,
        tokenize: Callable[[], list[Prompt]],
        http: Request,
    ) -> Response:
        """Tokenize (on a thread), check, submit each prompt; wait for each one's first token, then
        stream or collect the rest. Until the first tokens the request holds a place in ``queue``
        (429 if none is left)."""
        with queue.admit():
            prompts = await asyncio.to_thread(tokenize)
            if not all(p.ids for p in prompts):
                raise APIError(400, "the prompt is empty", param="prompt")
            param = "messages" if kind == "chat" else "prompt"
            params = [sampling_params(req, len(p.ids), param) for p in prompts]
            request_id = engine.new_request_id("chatcmpl" if kind == "chat" else "cmpl")
            # One prompt: one engine request under the response's id; a batch: one per prompt.
            ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
            streams = [
                metrics.track(rid, len(p.ids), ps.n, engine.generate(rid, p.ids, ps, p.text, stream=bool(req.stream)))
                for rid, p, ps in zip(ids, prompts, params, strict=True)
            ]
            firsts = await _unless_disconnected(first_deltas(streams, _first), http)
        if firsts is None:
            await close_all(streams)
            return Response(status_code=499)  # the client left; nobody reads this
        echo = isinstance(req, CompletionRequest) and req.echo
        shapers = [
            Shaper(
                engine,
                kind,
                request_id,
                model_name,
                len(p.ids),
                ps,
                first_index=i * ps.n,
                echo=_prompt_text(engine, p) if echo else None,
                echo_ids=p.ids,
            )
            for i, (p, ps) in enumerate(zip(prompts, params, strict=True))
        ]
        if isinstance(req, ChatCompletionRequest):  # one prompt: its choices may carry tool calls
            shapers[0].tool_calls = req.tool_call_output()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(firsts, streams, shapers, include_usage), media_type="text/event-stream")
        collecting = asyncio.gather(*(_collect(f, s) for f, s in zip(firsts, streams, strict=True)))
        try:
            seen = await _unless_disconnected(collecting, http)
        except EngineDeadError as err:  # failed after it began (a worker's step failed, no worker left)
            raise APIError(503, str(err), "server_error") from err
        return Response(status_code=499) if seen is None else JSONResponse(merge_full(shapers, list(seen)))

    @app.post("/v1/chat/completions", responses=STREAMED_RESPONSES)
    async def chat(req: ChatCompletionRequest, http: Request) -> Response:
        check_model(req.model)
        try:
            messages = [template_message(m.role, m.text(), m.tool_calls, m.tool_call_id) for m in req.messages]
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from err
        # As vLLM by default, the tools are in the prompt even under tool_choice="none".
        return await serve(
            req, "chat", lambda: [Prompt(encode_chat_with_tools(engine.tokenizer, messages, req.tools), None)], http
        )

    @app.post("/v1/completions", responses=STREAMED_RESPONSES)
    async def completions(req: CompletionRequest, http: Request) -> Response:
        check_model(req.model)
        batch = req.prompts()
        if len(batch) * req.n > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} completions a request (prompts x n)", param="prompt")

        def tokenize() -> list[Prompt]:
            encode = engine.tokenizer.encode
            return [
                Prompt(encode(p, add_special_tokens=False), p) if isinstance(p, str) else Prompt(p, None) for p in batch
            ]

        return await serve(req, "completion", tokenize, http)

    app.openapi = lambda: _openapi_schema(app, model_name)  # type: ignore[method-assign]
    return app


def _prompt_text(engine: EngineClient, prompt: Prompt) -> str:
    """The prompt as text, for ``echo``: as sent, or token ids decoded (as vLLM does)."""
    return prompt.text if prompt.text is not None else str(engine.tokenizer.decode(prompt.ids))


def _openapi_schema(app: FastAPI, model_name: str) -> dict[str, Any]:
    """FastAPI's schema, less the 422 it documents for every body (this app answers 400), and
    with ``model`` naming the one model served (another name is a 404; none, that one)."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        models = schema["components"]["schemas"]
        for name in ("HTTPValidationError", "ValidationError"):
            models.pop(name, None)
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            models[name]["properties"]["model"] = {"type": "string", "enum": [model_name], "title": "Model"}
    return app.openapi_schema or {}


def _validation_message(errors: Any) -> tuple[str, str | None]:
    """A 400's message and ``param`` from pydantic's errors: the top-level field is the param;
    where one value failed every branch of a union, the type mismatches are left out."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return "malformed JSON body", None
    wanted = [e for e in errors if not str(e.get("type", "")).endswith("_type")] or list(errors)
    lines, param = [], None
    for e in wanted[:3]:
        loc = [p for p in e.get("loc", ()) if p != "body" and (isinstance(p, int) or "[" not in str(p))]
        param = param or (str(loc[0]) if loc else None)
        msg = UNSUPPORTED if e.get("type") == "extra_forbidden" else e.get("msg", "invalid")
        lines.append(f"{'.'.join(map(str, loc)) or 'body'}: {msg}")
    return "; ".join(lines), param


async def _unless_disconnected(work: Awaitable[T], http: Request) -> T | None:
    """``work``'s result; None if the client hangs up first, in which case ``work`` is cancelled
    (cancelling a request's delta stream aborts the request, which frees its blocks)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(http))
    try:
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        await asyncio.gather(task, return_exceptions=True)  # let the abort run before we answer
        return None
    return task.result()


async def _disconnect(http: Request) -> None:
    """Returns when the client hangs up. The body has been read, so the next ASGI message is
    ``http.disconnect``; waiting for it costs nothing, where polling would cost a wake-up each."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _first(deltas: AsyncIterator[CompletionDelta]) -> CompletionDelta:
    try:
        return await deltas.__anext__()
    except SamplingParamsError as err:
        raise APIError(400, str(err), param=err.field) from err
    except EngineDeadError as err:
        raise APIError(503, str(err), "server_error") from err
    except ValueError as err:  # refused by the engine: too long, token ids out of range ...
        raise APIError(400, str(err)) from err


async def _collect(first: CompletionDelta, deltas: AsyncIterator[CompletionDelta]) -> list[CompletionDelta]:
    return [first, *[d async for d in deltas]]


async def _sse(
    firsts: list[CompletionDelta],
    streams: list[AsyncIterator[CompletionDelta]],
    shapers: list[Shaper],
    include_usage: bool,
) -> AsyncIterator[str]:
    try:
        for chunk in shapers[0].opening_chunks():
            yield _event(chunk, include_usage)
        for shaper, first in zip(shapers, firsts, strict=True):
            yield _event(shaper.chunk(first), include_usage)
        async for i, delta in merged(streams):
            yield _event(shapers[i].chunk(delta), include_usage)
        if include_usage:
            yield f"data: {json.dumps(usage_chunk(shapers))}\n\n"
    except EngineDeadError as err:  # after the stream began: an error event, then [DONE]
        yield f"data: {json.dumps(APIError(503, str(err), 'server_error').body())}\n\n"
    yield "data: [DONE]\n\n"


def _event(chunk: dict[str, Any], include_usage: bool) -> str:
    if include_usage:
        chunk["usage"] = None
    return f"data: {json.dumps(chunk)}\n\n"
