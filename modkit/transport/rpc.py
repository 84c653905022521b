"""RPC: a plain Python object hosted behind a ROUTER socket, called through a DEALER.

Frames (each payload is one msgpack frame, see ``modkit.protocol``)::

    client DEALER  --[ Call, MAC ]--------------->  ROUTER server   (arrives as [identity, Call, MAC])
    client DEALER  <--[ Reply | ErrorReply ]------  ROUTER server   (sent as [identity, reply])

The MAC frame is there when the client holds the launch's keys (``keys``, or the
process default a launched child has): HMAC-SHA256 of the Call frame. A server with keys
refuses a control call that is not signed, signed under other keys, stale or replayed,
with an ``ErrorReply`` naming ``PermissionError``, before it decodes an argument; only
liveness reads stay open (``modkit.transport.security``, which also makes every tcp://
socket a CURVE one).

The server runs ``getattr(obj, call.method)(*args, **kwargs)`` for public methods only
(no leading underscore, and only those in ``allowed_methods`` if given), after converting
each argument to its annotated type (a dict back into the Struct or dataclass the method
declares, as vLLM's engine core does for utility calls). Whatever the method raises goes
back as an ``ErrorReply`` and the server keeps serving; so does a frame that does not
decode (answered if it carried a ``req_id``, otherwise logged and dropped).

Timeouts, and why each exists:

- ``RpcClient.timeout_s``: every call polls for its reply and gives up with
  ``RpcTimeoutError`` (naming the method and address) instead of blocking forever on a
  dead or stuck server. The socket is then closed and reopened (zguide's Lazy Pirate):
  a request still queued for a server that never connected is dropped, not delivered
  later, and a late reply to the old request cannot reach the next call. Replies also
  carry the request id, and any other id is discarded.
- ``poll_once(timeout_s)``: how long a server waits for work before handing control back
  to its own loop (heartbeats, parent checks, a component's step loop).

Sockets are created with linger 0 (pending messages to a dead peer never hold up a close)
on the shared ``zmq.Context.instance()``; a process that exits closes its sockets first.
Neither class is thread-safe: one client per thread.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

import zmq

from modkit.protocol import LOOP, PING, SHUTDOWN, Call, ErrorReply, LaunchKeys, Reply
from modkit.transport import security
from modkit.transport.codec import (
    CallFrame,
    DecodeError,
    convert_or_keep,
    decode,
    decode_args,
    encode,
    return_type,
    server_decoder,
    signature,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_CALLS_PER_POLL = 100  # answer at most this many waiting calls before returning to the caller's loop


class RpcTimeoutError(TimeoutError):
    """No reply within the timeout: the server is dead, stuck, or slower than the caller allows."""

    def __init__(self, method: str, address: str, timeout_s: float) -> None:
        super().__init__(f"no reply to {method!r} from {address} within {timeout_s:g} s")
        self.method, self.address, self.timeout_s = method, address, timeout_s


class RemoteError(RuntimeError):
    """The remote method raised; ``type_name``, ``message`` and ``remote_traceback`` tell what."""

    def __init__(self, reply: ErrorReply, method: str, address: str) -> None:
        super().__init__(f"{reply.type_name}: {reply.message} (in {method!r} at {address})")
        self.type_name, self.message, self.remote_traceback = reply.type_name, reply.message, reply.traceback
        self.method, self.address = method, address


def new_socket(kind: int, ctx: zmq.Context[zmq.Socket[bytes]] | None = None) -> zmq.Socket[bytes]:
    """A socket of the shared context with linger 0, so closing it never waits for a dead peer."""
    sock = (ctx or zmq.Context.instance()).socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


class RpcServer:
    """Serves the public methods of ``obj`` on ``address`` (bound here; ``address`` attribute: the real endpoint)."""

    def __init__(
        self,
        obj: object,
        address: str,
        allowed_methods: Iterable[str] | None = None,
        *,
        allow_remote: bool = False,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        keys: LaunchKeys | None = None,
    ) -> None:
        self.obj = obj
        self.allowed = None if allowed_methods is None else frozenset(allowed_methods)
        for name in self.allowed or ():
            if name.startswith("_") or not callable(getattr(obj, name, None)):
                raise ValueError(f"allowed method {name!r} is not a public method of {type(obj).__name__}")
        self.socket = new_socket(zmq.ROUTER, ctx)  # exposed for callers that poll several sockets together
        keys = security.keys_or_default(keys)  # None: no keys, every call is served (started by hand)
        self.guard = None if keys is None else security.CallGuard(keys)
        self.address: str = security.bind(self.socket, address, keys, allow_remote=allow_remote)
        self.shutdown_requested = False  # set by a SHUTDOWN call; serve loops end when they see it
        self.loop_clock: Callable[[], dict[str, float]] | None = None  # answers LOOP calls; set by serve()
        self._signatures: dict[str, inspect.Signature | None] = {}

    def poll_once(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for calls, answer those waiting (at most 100); return how many."""
        if not self.socket.poll(max(0, round(timeout_s * 1000)), zmq.POLLIN):
            return 0
        for answered in range(MAX_CALLS_PER_POLL):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return answered
            self._handle(frames)
        return MAX_CALLS_PER_POLL

    def serve_forever(self, stop_event: threading.Event | None = None, tick_s: float = 0.1) -> None:
        """Serve until ``stop_event`` is set or a SHUTDOWN call arrives (checked every ``tick_s``)."""
        while not self.shutdown_requested and not (stop_event is not None and stop_event.is_set()):
            self.poll_once(tick_s)

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self) -> RpcServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) not in (2, 3):  # [identity, Call] or [identity, Call, MAC]; else not from an RpcClient
            log.warning("dropped a message of %d frames (expected identity, call and maybe a MAC)", len(frames))
            return
        identity, frame, signature = frames[0], frames[1], frames[2] if len(frames) == 3 else None
        try:
            call = server_decoder.decode(frame)  # the arguments stay msgpack until _dispatch
        except DecodeError as error:
            log.warning("%s", error)
            if error.req_id is not None:
                self._send(identity, ErrorReply(error.req_id, "DecodeError", str(error), ""))
            return
        if not isinstance(call, CallFrame):
            log.warning("dropped a %s sent to an RPC server (only calls are served)", type(call).__name__)
            return
        if self.guard is not None:
            try:
                self.guard.check(call, frame, signature)
            except PermissionError as error:  # refused before anything is decoded, looked up or run
                log.warning("refused %r: %s", call.method, error)
                self._send(identity, ErrorReply(call.req_id, "PermissionError", str(error), ""))
                return
        try:
            reply: Reply | ErrorReply = Reply(call.req_id, self._dispatch(call))
        except Exception as error:
            log.info("%s(...) raised %s: %s", call.method, type(error).__name__, error)
            reply = ErrorReply(call.req_id, type(error).__name__, str(error), traceback.format_exc())
        self._send(identity, reply)

    def _dispatch(self, call: CallFrame) -> Any:
        if call.method == PING:
            return {"pid": os.getpid(), "object": type(self.obj).__name__}
        if call.method == SHUTDOWN:
            self.shutdown_requested = True
            return None
        if call.method == LOOP:
            return None if self.loop_clock is None else self.loop_clock()
        method = self._lookup(call.method)
        if call.method not in self._signatures:  # resolving annotations costs more than a call: once per method
            self._signatures[call.method] = signature(method)
        args, kwargs = decode_args(self._signatures[call.method], call.args, call.kwargs)
        return method(*args, **kwargs)

    def _lookup(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise PermissionError(f"{name!r} is private: only public methods can be called")
        if self.allowed is not None and name not in self.allowed:
            raise PermissionError(f"{name!r} is not in the allowed methods {sorted(self.allowed)}")
        method = getattr(self.obj, name, None)
        if not callable(method):
            raise AttributeError(f"{type(self.obj).__name__} has no public method {name!r}")
        return cast(Callable[..., Any], method)

    def _send(self, identity: bytes, reply: Reply | ErrorReply) -> None:
        try:
            frame = encode(reply)
        except TypeError as error:  # a result msgpack cannot carry: tell the caller instead of going silent
            frame = encode(ErrorReply(reply.req_id, "TypeError", f"the result cannot be sent: {error}", ""))
        # NOTE: a ROUTER silently drops a message for a peer that has gone (e.g. a client that
        # timed out and reopened its socket): that is how late replies vanish.
        self.socket.send_multipart([identity, frame])


class RpcClient:
    """Calls the object served at ``address``; every call gives up after ``timeout_s`` seconds.

    With ``keys`` (default: the process's, see ``modkit.transport.security``) every call is
    signed, and a tcp:// address is reached over CURVE.
    """

    def __init__(
        self,
        address: str,
        timeout_s: float = 5.0,
        *,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        keys: LaunchKeys | None = None,
    ) -> None:
        self.address, self.timeout_s, self._ctx = address, timeout_s, ctx
        self.keys = security.keys_or_default(keys)
        self._client_id = security.new_client_id()  # with the growing req_id, names each signed call once
        self._req_ids = itertools.count(1)
        self._socket = self._connect()

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``obj.method(*args, **kwargs)`` on the server; results come back as decoded builtins."""
        return self.invoke(method, args, kwargs)

    def notify(self, method: str, *args: Any) -> None:
        """``obj.method(*args)`` on the server, without waiting for it: for a call whose result the
        caller does not need. Its reply, when it comes, is discarded by the next ``call`` (as a
        stale one); an error is only logged by the server. RpcTimeoutError if the queue is full."""
        try:
            self._socket.send_multipart(self._frames(next(self._req_ids), method, list(args), {}), zmq.NOBLOCK)
        except zmq.Again:
            self._reconnect()
            raise RpcTimeoutError(method, self.address, 0.0) from None

    def invoke(
        self,
        method: str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Any:
        """``call`` with an explicit timeout. Raises RpcTimeoutError, RemoteError, or TypeError (unencodable args)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        req_id = next(self._req_ids)
        frames = self._frames(req_id, method, list(args), dict(kwargs or {}))
        deadline = time.monotonic() + timeout_s
        try:
            self._socket.send_multipart(frames, zmq.NOBLOCK)  # Again: the queue to the server is full
        except zmq.Again:
            self._reconnect()
            raise RpcTimeoutError(method, self.address, timeout_s) from None
        while (remaining := deadline - time.monotonic()) > 0:
            if not self._socket.poll(math.ceil(remaining * 1000), zmq.POLLIN):
                continue
            try:
                reply = decode(self._socket.recv())
            except DecodeError as error:
                log.warning("ignored an undecodable reply from %s: %s", self.address, error)
                continue
            if not isinstance(reply, (Reply, ErrorReply)) or reply.req_id != req_id:
                log.debug("discarded a stale %s from %s", type(reply).__name__, self.address)
                continue
            if isinstance(reply, ErrorReply):
                raise RemoteError(reply, method, self.address)
            return reply.result
        self._reconnect()
        raise RpcTimeoutError(method, self.address, timeout_s)

    def _frames(self, req_id: int, method: str, args: list[Any], kwargs: dict[str, Any]) -> list[bytes]:
        """``[Call]``, or ``[Call, MAC]`` with the time and this client's id when it holds keys."""
        if self.keys is None:
            return [encode(Call(req_id, method, args, kwargs))]
        frame = encode(Call(req_id, method, args, kwargs, time.time(), self._client_id))
        return [frame, security.mac(frame, self.keys)]

    def ping(self, timeout_s: float = 1.0) -> dict[str, Any]:
        """The server's pid and object type; RpcTimeoutError if its serve loop is not turning."""
        return cast(dict[str, Any], self.invoke(PING, timeout_s=timeout_s))

    def shutdown(self, timeout_s: float = 1.0) -> None:
        """Ask the server's serve loop to end after answering."""
        self.invoke(SHUTDOWN, timeout_s=timeout_s)

    def proxy(self, interface: type[T]) -> T:
        """An object with ``interface``'s methods that calls them here, converting results to their annotated types."""
        return cast(T, _Proxy(self, interface))

    def close(self) -> None:
        self._socket.close(linger=0)

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> zmq.Socket[bytes]:
        sock = new_socket(zmq.DEALER, self._ctx)
        security.connect(sock, self.address, self.keys)
        return sock

    def _reconnect(self) -> None:
        self._socket.close(linger=0)  # drops any request still queued for a server that never took it
        self._socket = self._connect()


class _Proxy:
    """Looks like ``interface``; each method call becomes an RPC whose result is converted to the return annotation."""

    def __init__(self, client: RpcClient, interface: type) -> None:
        self._client, self._interface = client, interface

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_") or not callable(getattr(self._interface, name, None)):
            raise AttributeError(f"{self._interface.__name__} has no public method {name!r}")
        returns = return_type(getattr(self._interface, name))

        def remote_method(*args: Any, **kwargs: Any) -> Any:
            return convert_or_keep(self._client.call(name, *args, **kwargs), returns)

        remote_method.__name__ = name
        return remote_method
