"""The OpenAI-compatible HTTP API: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``, ``/health``, ``/stats``.

The app talks to an engine through ``EngineClient`` (``interface.py``): ``generate`` (an
async stream of deltas) and ``abort``, in this process or across the pipeline; it
tokenizes, validates, and shapes responses. Errors
are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``, 400 for a bad
request (validation, malformed JSON, a prompt too long for the context), 404 for an
unknown model, 401 for a missing or wrong API key, 503 when the engine has failed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from modkit.engine.async_engine import EngineDeadError
from modkit.engine.output_processor import CompletionDelta
from modkit.frontend.interface import EngineClient
from modkit.frontend.protocol import ChatCompletionRequest, CompletionRequest
from modkit.model import encode_chat
from modkit.sampling_params import SamplingParams, SamplingParamsError


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def build_app(engine: EngineClient, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="modkit", summary="OpenAI-compatible API over modkit's engine")
    started = time.time()

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = "malformed JSON body" if first.get("type") == "json_invalid" else first.get("msg", str(err))
        return JSONResponse(APIError(400, message, param=".".join(loc) or None).body(), status_code=400)

    @app.middleware("http")
    async def check_api_key(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                body = APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
                return JSONResponse(body.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        # Only the pipeline's engine has parts that can be down: its supervisor sets this list.
        down = list(getattr(engine, "down_components", []))
        ok = engine.error is None and not engine.draining and not down
        status = "error" if engine.error is not None else "draining" if engine.draining else "degraded"
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
        if down:
            body["down"] = down
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return dict(engine.stats())

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": model_name,
            "object": "model",
            "created": int(started),
            "owned_by": "modkit",
            "max_model_len": engine.max_model_len,
        }
        return {"object": "list", "data": [card]}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves '{model_name}'",
                param="model",
                code="model_not_found",
            )

    def sampling_params(req: ChatCompletionRequest | CompletionRequest, prompt_len: int) -> SamplingParams:
        room = engine.max_model_len - prompt_len
        if room < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {engine.max_model_len} tokens; the prompt has {prompt_len}.",
                param="messages",
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

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, http: Request) -> Response:
        check_model(req.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from err
        prompt_ids = encode_chat(engine.tokenizer, messages)
        params = sampling_params(req, len(prompt_ids))
        request_id = engine.new_request_id("chatcmpl")
        deltas = engine.generate(request_id, prompt_ids, params, stream=bool(req.stream))
        shaper = _Shaper(engine, "chat", request_id, model_name, len(prompt_ids), params)
        return await _respond(req.stream, req.stream_options, deltas, shaper, http)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: Request) -> Response:
        check_model(req.model)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if isinstance(req.prompt, str):
            prompt_ids = list(engine.tokenizer.encode(req.prompt, add_special_tokens=False))
        else:
            prompt_ids = list(req.prompt)
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        params = sampling_params(req, len(prompt_ids))
        request_id = engine.new_request_id("cmpl")
        text = req.prompt if isinstance(req.prompt, str) else None
        deltas = engine.generate(request_id, prompt_ids, params, text, stream=bool(req.stream))
        shaper = _Shaper(engine, "completion", request_id, model_name, len(prompt_ids), params)
        return await _respond(req.stream, req.stream_options, deltas, shaper, http)

    return app


async def _respond(
    stream: bool, options: Any, deltas: AsyncIterator[CompletionDelta], shaper: _Shaper, http: Request
) -> Response:
    first = await _first(deltas)  # raises here (as a 4xx) if the engine refuses the request
    if stream:
        include_usage = bool(options and options.include_usage)
        return StreamingResponse(_sse(first, deltas, shaper, include_usage), media_type="text/event-stream")
    collect = asyncio.ensure_future(_collect(first, deltas))
    while not collect.done():  # a client that hangs up aborts its request (the generator's finally)
        await asyncio.wait([collect], timeout=1.0)  # each look costs the server: once a second each
        if not collect.done() and await http.is_disconnected():
            collect.cancel()
            return Response(status_code=499)
    try:
        deltas_seen = collect.result()
    except EngineDeadError as err:  # failed after it began (a worker's step failed, no worker left)
        raise APIError(503, str(err), "server_error") from err
    return JSONResponse(shaper.full(deltas_seen))


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
    first: CompletionDelta, deltas: AsyncIterator[CompletionDelta], shaper: _Shaper, include_usage: bool
) -> AsyncIterator[str]:
    try:
        for chunk in shaper.opening_chunks():
            yield _event(chunk, include_usage)
        yield _event(shaper.chunk(first), include_usage)
        async for delta in deltas:
            yield _event(shaper.chunk(delta), include_usage)
        if include_usage:
            yield f"data: {json.dumps(shaper.usage_chunk())}\n\n"
    except EngineDeadError as err:  # after the stream began: an error event, then [DONE]
        yield f"data: {json.dumps(APIError(503, str(err), 'server_error').body())}\n\n"
    yield "data: [DONE]\n\n"


def _event(chunk: dict[str, Any], include_usage: bool) -> str:
    if include_usage:
        chunk["usage"] = None
    return f"data: {json.dumps(chunk)}\n\n"


class _Shaper:
    """Builds the JSON bodies of one response, streamed or whole."""

    def __init__(
        self, engine: EngineClient, kind: str, request_id: str, model: str, prompt_len: int, params: SamplingParams
    ) -> None:
        self.engine, self.kind, self.id, self.model = engine, kind, request_id, model
        self.prompt_len, self.params, self.created = prompt_len, params, int(time.time())
        self.completion_tokens = 0

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_len,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_len + self.completion_tokens,
        }

    def opening_chunks(self) -> list[dict[str, Any]]:
        if self.kind != "chat":
            return []
        return [
            self._envelope(
                "chat.completion.chunk",
                [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(self.params.n)
                ],
            )
        ]

    def chunk(self, d: CompletionDelta) -> dict[str, Any]:
        self.completion_tokens += len(d.new_token_ids)
        choice: dict[str, Any] = {
            "index": d.index,
            "logprobs": self._logprobs(d.new_token_ids, d.new_logprobs),
            "finish_reason": d.finish_reason,
        }
        if self.kind == "chat":
            choice["delta"] = {"content": d.text} if d.text or d.finish_reason is None else {}
            return self._envelope("chat.completion.chunk", [choice])
        choice["text"] = d.text
        return self._envelope("text_completion", [choice])

    def usage_chunk(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj, []), "usage": self.usage()}

    def full(self, deltas: list[CompletionDelta]) -> dict[str, Any]:
        choices = []
        for i in range(self.params.n):
            mine = [d for d in deltas if d.index == i]
            ids = [t for d in mine for t in d.new_token_ids]
            lps = [lp for d in mine for lp in (d.new_logprobs or [])] if self.params.logprobs is not None else None
            self.completion_tokens += len(ids)
            text, last = "".join(d.text for d in mine), mine[-1]
            choice: dict[str, Any] = {
                "index": i,
                "logprobs": self._logprobs(ids, lps),
                "finish_reason": last.finish_reason,
            }
            if self.kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj, choices), "usage": self.usage()}

    def _logprobs(self, ids: list[int], lps: list[Any] | None) -> dict[str, Any] | None:
        if self.params.logprobs is None or lps is None:
            return None
        tok = self.engine.tokenizer

        def piece(t: int) -> str:
            return str(tok.decode([t]))

        if self.kind == "chat":
            content = []
            for token, entry in zip(ids, lps, strict=True):
                top = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[: self.params.logprobs]
                content.append(
                    {
                        "token": piece(token),
                        "logprob": entry[token].logprob,
                        "bytes": list(piece(token).encode()),
                        "top_logprobs": [
                            {"token": piece(t), "logprob": lp.logprob, "bytes": list(piece(t).encode())}
                            for t, lp in top
                        ],
                    }
                )
            return {"content": content}
        return {
            "tokens": [piece(t) for t in ids],
            "token_logprobs": [e[t].logprob for t, e in zip(ids, lps, strict=True)],
            "top_logprobs": [
                {
                    piece(t): lp.logprob
                    for t, lp in sorted(e.items(), key=lambda kv: -kv[1].logprob)[: self.params.logprobs]
                }
                for e in lps
            ],
        }
