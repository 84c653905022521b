"""What the HTTP front checks before a request reaches the API: the API key, the body's
size, and how many requests are already waiting for their first token.

The two middlewares are plain ASGI apps that wrap the FastAPI app. They are not
``@app.middleware("http")`` (Starlette's ``BaseHTTPMiddleware``): that one wraps the
``receive`` channel, and behind it a handler never sees the client's disconnect, so a
non-streaming request ran to its end for a client that had gone.

Each answers in OpenAI's error shape (``error_body``): 401 for a missing or wrong key,
413 for a body over the limit. ``RequestQueue`` is the backpressure: 429 with
``Retry-After`` once ``max_queued_requests`` requests wait for their first token
(``ShedWhenFull`` answers it before the body is even read). All of it runs on the server's
one event loop, so the counts need no lock.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPEN_PATHS = ("/health",)  # answered without the API key: a load balancer's probe carries none
RETRY_AFTER_S = 1  # what a 429 tells the client to wait; a queue drains in about a step's time per request


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    """Answered with ``status`` and OpenAI's error shape (the app's exception handler)."""

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
        return error_body(self.message, self.type, self.param, self.code)


async def send_error(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    """A whole JSON error response, written straight to ASGI (for the middlewares, which run outside FastAPI)."""
    payload = json.dumps(body).encode()  # ASCII: any string the client sent survives the encoding
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class RequireAPIKey:
    """401 unless the request carries ``Authorization: Bearer <api_key>``; ``/health`` stays open."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):
                body = error_body("invalid or missing API key", "authentication_error", code="invalid_api_key")
                await send_error(send, 401, body)
                return
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body without Content-Length grows past the limit. An
    ``HTTPException``, so that FastAPI, reading the body, lets it through to the app's handler."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes (max_request_body_bytes)")


class LimitRequestBody:
    """413 for a body over ``max_bytes``: decided from Content-Length before anything is read,
    or counted chunk by chunk while the app reads a body sent without one (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await send_error(send, 413, error_body(BodyTooLarge(self.max_bytes).detail, "invalid_request_error"))
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)


class ShedWhenFull:
    """429 for a new completion while ``queue`` is full, before its body is read or parsed:
    under a flood, refusing must cost less than serving. ``RequestQueue.admit`` in the
    handler makes the exact check; this one only saves the work."""

    def __init__(self, app: ASGIApp, queue: RequestQueue, paths: tuple[str, ...]) -> None:
        self.app, self.queue, self.paths = app, queue, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths and self.queue.full():
            self.queue.num_refused += 1
            err = QueueFull(self.queue.max_queued)
            await send_error(send, 429, err.body(), {"Retry-After": str(RETRY_AFTER_S)})
            return
        await self.app(scope, receive, send)


class QueueFull(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the server already has {limit} requests waiting for their first token "
            f"(max_queued_requests); retry after {RETRY_AFTER_S} s"
        )

    def body(self) -> dict[str, Any]:
        return error_body(str(self), "rate_limit_error", code="rate_limit_exceeded")


class RequestQueue:
    """Counts the requests accepted and not yet at their first token (tokenizing, waiting in
    the scheduler, prefilling); refuses a new one once ``max_queued`` are there.

    A request leaves the count at its first token, or when it fails or its client leaves
    first. Requests already streaming are not counted: the scheduler's ``max_num_seqs``
    bounds those.
    """

    def __init__(self, max_queued: int) -> None:
        self.max_queued = max_queued
        self.num_queued = 0
        self.num_refused = 0

    def full(self) -> bool:
        return self.num_queued >= self.max_queued

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a place while the block runs; ``QueueFull`` (429) if there is none."""
        if self.full():
            self.num_refused += 1
            raise QueueFull(self.max_queued)
        self.num_queued += 1
        try:
            yield
        finally:
            self.num_queued -= 1
