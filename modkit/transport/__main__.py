"""The child side of ``ComponentProcess``: ``python -m modkit.transport`` with a ChildSpec on stdin.

1. Read one JSON line from stdin (a ``ChildSpec``); make its keys this process's default
   (every socket the component opens signs and checks calls with them, and speaks CURVE
   on tcp://, see ``modkit.transport.security``); import ``target``, build the object.
2. Serve it with ``RpcServer`` on ``address`` (and ``/health`` on ``http_port`` if given);
   send ``Ready`` to the launcher.
3. Run ``modkit.transport.serve``'s loop: answer calls, run the object's own loop, send a
   ``Heartbeat`` every interval, and watch the launcher.
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
from modkit.transport import security
from modkit.transport.codec import convert_args, encode, signature
from modkit.transport.rpc import RpcServer, new_socket
from modkit.transport.serve import HealthHTTPServer, serve

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
        cleanup.callback(security.stop_authenticators)  # CURVE's ZAP threads, before their context goes
        security.set_process_keys(spec.keys)
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
        if spec.http_port is not None:  # bound before Ready: a taken port fails the start, with this log
            http = HealthHTTPServer(
                spec.http_host, spec.http_port, server.address, spec.name, keys=spec.keys, api_key=spec.http_api_key
            )
            cleanup.callback(http.close)
        control.send(encode(Ready(spec.name, os.getpid(), server.address)))  # queued until connected
        log.info("%s ready: %s serving on %s", spec.name, spec.target, server.address)
        seq = 0

        def on_tick() -> bool:
            nonlocal seq
            if os.getppid() != launcher:
                log.warning("launcher %d is gone; exiting", launcher)
                return False
            with contextlib.suppress(zmq.Again):  # NOBLOCK: a heartbeat nobody reads is dropped, not waited for
                heartbeats.send(encode(Heartbeat(spec.name, os.getpid(), seq, time.monotonic())), zmq.NOBLOCK)
            seq += 1
            return True

        def on_stdin(fd: int) -> bool:
            if os.read(fd, 4096):
                return True
            log.warning("launcher closed our stdin; exiting")  # readable at EOF: the launcher is gone
            return False

        serve(obj, server, tick_s=spec.heartbeat_interval_s, on_tick=on_tick, extra_fds=[stdin_fd], on_fd=on_stdin)
        if server.shutdown_requested:
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


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown, once every socket is closed and every log line written.

    NOTE: tearing down a process that imported torch takes most of a second; a pipeline
    stops six or more of them, so each exits as soon as its own cleanup is done.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
