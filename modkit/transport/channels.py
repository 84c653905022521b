"""One-way channels for the pipeline's data plane: PUSH -> PULL, typed messages, never blocking.

::

    Outbox(address).send(msg)  --PUSH-->  Inbox(address).drain()   (many outboxes, one inbox)

An ``Inbox`` binds; every ``Outbox`` connects, so components can start in any order
(ZeroMQ reconnects by itself). Messages are the tagged Structs of
``modkit.protocol.PipelineMessage``; a frame that does not decode is logged and dropped.

Why not RPC here: a scheduler that waited for each worker to answer could not plan the
next worker's step meanwhile, and a slow frontend would stall the engine. Pushing lets
each loop go on; the receiver's loop wakes when its inbox is readable (``socket``).

On a tcp:// address, with the launch's keys (``keys``, or the process default a launched
child has), an inbox is a CURVE server that admits only the launch's outboxes: a frame
pushed by anyone else never arrives (``modkit.transport.security``). On ipc:// the 0700
directory is the only lock.

``Beacon`` sends a message every interval from a thread of its own: a worker's
heartbeat keeps beating while its main thread is busy in a long forward, so "no beat"
means the process is gone, not that it is slow.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from modkit.protocol import LaunchKeys, PipelineMessage
from modkit.transport import security
from modkit.transport.addresses import remove_ipc_file
from modkit.transport.codec import DecodeError, Decoder, encode
from modkit.transport.rpc import new_socket

log = logging.getLogger(__name__)
MAX_DRAIN = 10_000  # messages taken in one drain(), so one busy sender cannot starve a loop
SEND_HWM = 100_000  # messages queued per peer before send() raises instead of waiting

pipeline_decoder: Decoder[PipelineMessage] = Decoder(PipelineMessage)


class ChannelFullError(RuntimeError):
    """The receiver is gone or far behind: ``SEND_HWM`` messages are already queued for it."""


class Inbox:
    """Binds a PULL socket on ``address``; ``drain()`` takes whatever has arrived."""

    def __init__(self, address: str, *, allow_remote: bool = False, keys: LaunchKeys | None = None) -> None:
        self.socket = new_socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, 0)  # 0: no limit; the senders' HWM is what bounds the queue
        keys = security.keys_or_default(keys)
        self.address: str = security.bind(self.socket, address, keys, allow_remote=allow_remote)

    def drain(self) -> list[PipelineMessage]:
        """Every message waiting now (up to ``MAX_DRAIN``), in arrival order; never blocks."""
        messages: list[PipelineMessage] = []
        while len(messages) < MAX_DRAIN:
            try:
                frame = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                messages.append(pipeline_decoder.decode(frame))
            except DecodeError as error:
                log.warning("dropped a frame on %s: %s", self.address, error)
        return messages

    def recv(self, timeout_s: float) -> PipelineMessage | None:
        """The next message, or None after ``timeout_s`` (for tests and simple loops)."""
        if not self.socket.poll(max(0, round(timeout_s * 1000)), zmq.POLLIN):
            return None
        found = self.drain()  # NOTE: takes every waiting message; only the first is returned
        return found[0] if found else None

    def close(self) -> None:
        self.socket.close(linger=0)
        remove_ipc_file(self.address)


class Outbox:
    """Connects a PUSH socket to an ``Inbox``'s address; ``send`` never waits."""

    def __init__(self, address: str, ctx: zmq.Context[Any] | None = None, *, keys: LaunchKeys | None = None) -> None:
        self.address = address
        self.socket = new_socket(zmq.PUSH, ctx)
        self.socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        security.connect(self.socket, address, security.keys_or_default(keys))

    def send(self, message: PipelineMessage) -> None:
        """Queue ``message`` for the inbox; ``ChannelFullError`` if ``SEND_HWM`` are already queued."""
        try:
            self.socket.send(encode(message), zmq.NOBLOCK)
        except zmq.Again:
            raise ChannelFullError(f"{self.address}: {SEND_HWM} messages queued; is the receiver alive?") from None

    def close(self) -> None:
        self.socket.close(linger=0)


class AsyncInbox:
    """An ``Inbox`` for asyncio code (the frontend's event loop): ``await recv()``."""

    def __init__(self, address: str, *, allow_remote: bool = False, keys: LaunchKeys | None = None) -> None:
        self._ctx = zmq.asyncio.Context()
        self.socket = self._ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        keys = security.keys_or_default(keys)
        self.address: str = security.bind(self.socket, address, keys, allow_remote=allow_remote)

    async def recv(self) -> PipelineMessage | None:
        """The next message; None for a frame that did not decode (logged)."""
        frame = await self.socket.recv()
        try:
            return pipeline_decoder.decode(frame)
        except DecodeError as error:
            log.warning("dropped a frame on %s: %s", self.address, error)
            return None

    def close(self) -> None:
        self.socket.close(linger=0)
        security.stop_authenticator(self._ctx)  # a CURVE inbox's ZAP thread holds a socket of the context
        self._ctx.term()
        remove_ipc_file(self.address)


class Beacon:
    """Sends ``make_message()`` to ``address`` every ``interval_s`` from a daemon thread until ``close()``."""

    def __init__(self, address: str, make_message: Callable[[], PipelineMessage], interval_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(address, make_message, interval_s), name="modkit-beacon", daemon=True
        )
        self._thread.start()

    def _run(self, address: str, make_message: Callable[[], PipelineMessage], interval_s: float) -> None:
        outbox = Outbox(address)  # created in this thread: a socket belongs to one thread
        try:
            while not self._stop.is_set():
                with contextlib.suppress(ChannelFullError):  # nobody listening yet: beats are dropped
                    outbox.send(make_message())
                self._stop.wait(interval_s)
        finally:
            outbox.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
