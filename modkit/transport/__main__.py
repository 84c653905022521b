"""The child side of ``ComponentProcess``: ``python -m modkit.transport`` with a ChildSpec on stdin.

1. Read one JSON line from stdin (a ``ChildSpec``), import ``target``, build the object.
2. Serve it with ``RpcServer`` on ``address``; send ``Ready`` to the launcher.
3. Loop: answer calls, send a ``Heartbeat`` every interval, and watch the launcher.
4. Leave the loop on a SHUTDOWN call, on SIGTERM, or when the launcher is gone (stdin
   closed, or a new parent pid); then call the object's ``close()`` if it has one,
   close every socket, then the context. A failure to start is printed (to the log the
   launcher shows in ``ComponentStartError``) and the exit code is 1.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import msgspec
import zmq

from modkit.protocol import ChildSpec, Heartbeat, Ready
from modkit.transport.codec import convert_args, encode, signature
from modkit.transport.rpc import RpcServer, new_socket

log = logging.getLogger("modkit.transport.child")


def load_target(path: str) -> Callable[..., object]:
    """The class or factory named by ``"package.module:Name"`` (``Name`` may be dotted)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"target must look like 'package.module:Name', got {path!r}")
    found: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        found = getattr(found, part)
    if not callable(found):
        raise TypeError(f"target {path!r} is not a class or function")
    return found


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks, which close the sockets


def serve_child(spec: ChildSpec, stdin_fd: int) -> None:
    """Build, serve and report until told to stop or orphaned (steps 1 to 4 above)."""
    launcher = os.getppid()
    with contextlib.ExitStack() as cleanup:  # runs last-registered first: sockets, obj.close(), the context
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        cleanup.callback(ctx.destroy, linger=0)  # also closes any socket the object left open
        target = load_target(spec.target)
        args, kwargs = convert_args(signature(target), [], spec.kwargs)  # dicts back into declared Structs
        obj = target(*args, **kwargs)
        close = getattr(obj, "close", None)
        if callable(close):
            cleanup.callback(close)
        server = RpcServer(obj, spec.address, spec.allowed_methods, allow_remote=spec.allow_remote)
        cleanup.enter_context(server)
        control = cleanup.enter_context(new_socket(zmq.PUSH))
        heartbeats = cleanup.enter_context(new_socket(zmq.PUSH))
        control.connect(spec.control_address)
        heartbeats.connect(spec.heartbeat_address)
        control.send(encode(Ready(spec.name, os.getpid(), server.address)))  # queued until connected
        log.info("%s ready: %s serving on %s", spec.name, spec.target, server.address)
        poller = zmq.Poller()
        poller.register(server.socket, zmq.POLLIN)
        poller.register(stdin_fd, zmq.POLLIN)  # readable at EOF: the launcher closed the pipe or died
        seq, next_beat = 0, 0.0
        while not server.shutdown_requested:
            if time.monotonic() >= next_beat:
                if os.getppid() != launcher:
                    log.warning("launcher %d is gone; exiting", launcher)
                    return
                with contextlib.suppress(zmq.Again):  # NOBLOCK: a heartbeat nobody reads is dropped, not waited for
                    heartbeats.send(encode(Heartbeat(spec.name, os.getpid(), seq, time.monotonic())), zmq.NOBLOCK)
                seq, next_beat = seq + 1, time.monotonic() + spec.heartbeat_interval_s
            events = dict(poller.poll(max(1, round((next_beat - time.monotonic()) * 1000))))
            if stdin_fd in events and not os.read(stdin_fd, 4096):
                log.warning("launcher closed our stdin; exiting")
                return
            if server.socket in events:
                server.poll_once(0)
        log.info("%s: shutdown requested", spec.name)


def main() -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    stdin_fd = sys.stdin.fileno()
    line = b""
    while not line.endswith(b"\n"):  # raw reads: nothing may sit in a Python buffer that poll() cannot see
        chunk = os.read(stdin_fd, 65536)
        if not chunk:
            print("modkit.transport: expected a ChildSpec JSON line on stdin", file=sys.stderr)
            return 2
        line += chunk
    spec = msgspec.json.decode(line, type=ChildSpec)
    logging.basicConfig(
        level=spec.log_level, format=f"%(asctime)s {spec.name}[%(process)d] %(levelname)s %(name)s: %(message)s"
    )
    try:
        serve_child(spec, stdin_fd)
    except Exception:
        log.exception("%s failed", spec.name)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
