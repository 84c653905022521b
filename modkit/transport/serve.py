"""The serve loop every component process runs, and its ``/health`` / ``/stats`` / ``/metrics`` HTTP port.

One thread owns the component object and all its sockets::

    loop:
        poll(RPC socket, the object's inboxes, extra fds) until something arrives or the tick
        answer waiting RPC calls                        (health, stats, KV allocations, ...)
        obj.run_once()                                  (drain inboxes, plan or run a step)
        every tick: on_tick() (heartbeat to the launcher, parent checks)

The loop keeps a clock (``LoopClock``): the seconds it waited in that poll with nothing to
do, and the rest, busy. ``/stats`` shows it as ``loop``; a process whose loop is busy
nearly all the time is the one the others wait for. (A worker's loop also turns without
waiting while a step is on the device, so its busy time includes waiting for the GPU.)

A component with a loop of its own (scheduler, worker, router, sampler) has
``run_once() -> bool`` (True: more work is ready now, poll without waiting) and
``wait_sockets()`` (what to wake up for). A passive one (the KV cache manager) only
answers calls.

The HTTP port is a small stdlib server on a thread of its own. It does not touch the
object: it asks the serve loop over RPC (``health``, ``stats``), so ``/health`` answers
200 only while the loop really turns, and 503 when the object says it cannot do its job
or the loop does not answer in time. ``/metrics`` is ``/stats`` in Prometheus' text format
(``modkit.transport.prometheus``). ``/health`` is open to anyone who reaches the port; with
an ``api_key``, ``/stats`` and ``/metrics`` answer 401 unless the request carries
``Authorization: Bearer <api_key>``.
"""

from __future__ import annotations

import cProfile
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import zmq

from modkit.heap import frozen_heap
from modkit.protocol import LOOP, LaunchKeys
from modkit.transport.prometheus import CONTENT_TYPE, render_stats
from modkit.transport.rpc import RemoteError, RpcClient, RpcServer, RpcTimeoutError

log = logging.getLogger(__name__)
HEALTH_RPC_TIMEOUT_S = 5.0  # a serve loop that cannot answer in this long is reported unresponsive


class HasSocket(Protocol):
    socket: Any


@dataclass(slots=True)
class LoopClock:
    """Where a serve loop's time goes: waiting for a message with nothing to do (idle), or the rest (busy)."""

    started: float = field(default_factory=time.perf_counter)
    idle_s: float = 0.0
    num_turns: int = 0

    def snapshot(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.started
        busy = max(0.0, elapsed - self.idle_s)
        return {
            "elapsed_s": elapsed,
            "busy_s": busy,
            "idle_s": self.idle_s,
            "busy_fraction": busy / elapsed if elapsed > 0 else 0.0,
            "num_turns": self.num_turns,
        }


def serve(
    obj: object,
    server: RpcServer,
    *,
    tick_s: float = 0.5,
    on_tick: Callable[[], bool] | None = None,
    extra_fds: Iterable[int] = (),
    on_fd: Callable[[int], bool] | None = None,
) -> None:
    """Run the loop above until a SHUTDOWN call, or ``on_tick``/``on_fd`` return False.

    With ``MODKIT_PROFILE_DIR`` set in the environment, the loop runs under ``cProfile`` and
    leaves ``<dir>/<ClassName>-<pid>.prof`` when it ends (read it with ``pstats``): where a
    component's own time goes, ``scripts/profile_pipeline.py`` summarises them.
    """
    profile_dir = os.environ.get("MODKIT_PROFILE_DIR")
    if not profile_dir:
        with frozen_heap():  # the component is built: full collections skip its startup heap
            _serve(obj, server, tick_s, on_tick, extra_fds, on_fd)
        return
    profiler = cProfile.Profile()
    try:
        with frozen_heap():
            profiler.runcall(_serve, obj, server, tick_s, on_tick, extra_fds, on_fd)
    finally:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(Path(profile_dir) / f"{type(obj).__name__}-{os.getpid()}.prof")


def _serve(
    obj: object,
    server: RpcServer,
    tick_s: float,
    on_tick: Callable[[], bool] | None,
    extra_fds: Iterable[int],
    on_fd: Callable[[int], bool] | None,
) -> None:
    run_once: Callable[[], bool] | None = getattr(obj, "run_once", None)
    waits: Callable[[], list[HasSocket]] | None = getattr(obj, "wait_sockets", None)
    poller = zmq.Poller()
    poller.register(server.socket, zmq.POLLIN)
    for holder in waits() if waits is not None else ():
        poller.register(holder.socket, zmq.POLLIN)
    fds = list(extra_fds)
    for fd in fds:
        poller.register(fd, zmq.POLLIN)
    clock = LoopClock()
    server.loop_clock = clock.snapshot
    busy, next_tick = True, 0.0
    while not server.shutdown_requested:
        now = time.monotonic()
        if now >= next_tick:
            if on_tick is not None and not on_tick():
                return
            next_tick = now + tick_s
        clock.num_turns += 1
        if busy:
            events = dict(poller.poll(0))
        else:  # nothing to do until a message comes: the clock counts this wait as idle
            waited = time.perf_counter()
            events = dict(poller.poll(max(1, round((next_tick - time.monotonic()) * 1000))))
            clock.idle_s += time.perf_counter() - waited
        for fd in fds:
            if fd in events and on_fd is not None and not on_fd(fd):
                return
        if server.socket in events:
            server.poll_once(0)
        busy = run_once() if run_once is not None else False


class HealthHTTPServer:
    """``GET /health``, ``/stats`` and ``/metrics`` on ``host:port``, answered by calling the serve loop at
    ``rpc_address``.

    ``keys`` sign those calls (the launch's); ``api_key``, if set, guards ``/stats`` and ``/metrics``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        rpc_address: str,
        name: str,
        *,
        keys: LaunchKeys | None = None,
        api_key: str | None = None,
    ) -> None:
        handler = _handler_class(rpc_address, name, keys, api_key)
        self.httpd = ThreadingHTTPServer((host, port), handler)  # OSError here if the port is taken
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name=f"{name}-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=2)


def _handler_class(
    rpc_address: str, name: str, keys: LaunchKeys | None, api_key: str | None
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            if path not in ("/health", "/stats", "/metrics"):
                self._reply(404, {"error": f"no route {self.path}; try /health, /stats or /metrics"})
                return
            if path != "/health" and not self._authorized():
                self._reply(401, _unauthorized(path))
                return
            method = "stats" if path == "/metrics" else path.lstrip("/")
            try:
                with RpcClient(rpc_address, HEALTH_RPC_TIMEOUT_S, keys=keys) as rpc:
                    body = rpc.call(method)
                    if method == "stats" and isinstance(body, dict):  # with the serve loop's clock
                        body["loop"] = rpc.call(LOOP)
            except RpcTimeoutError:
                self._reply(503, {"status": "unresponsive", "component": name, "error": "serve loop did not answer"})
                return
            except RemoteError as error:
                self._reply(503, {"status": "error", "component": name, "error": str(error)})
                return
            if method == "health":
                body.setdefault("pid", os.getpid())
            if path == "/metrics":
                self._send(200, render_stats(name, body), CONTENT_TYPE)
                return
            ok = method != "health" or body.get("status") == "ok"
            self._reply(200 if ok else 503, body)

        def _authorized(self) -> bool:
            if api_key is None:
                return True
            given = self.headers.get("Authorization", "")
            return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

        def _reply(self, code: int, body: dict[str, Any]) -> None:
            self._send(code, json.dumps(body).encode(), "application/json")

        def _send(self, code: int, data: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            if code == 401:
                self.send_header("WWW-Authenticate", "Bearer")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


def _unauthorized(path: str) -> dict[str, Any]:
    """The OpenAI error shape, as the frontend answers a missing or wrong key."""
    message = f"{path} needs the API key: send 'Authorization: Bearer <api_key>'"
    return {"error": {"message": message, "type": "authentication_error", "param": None, "code": "invalid_api_key"}}
