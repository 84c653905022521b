"""Pub/sub: one publisher streams numbered messages to any number of subscribers.

Frames, as vLLM's KV cache events (``vllm/distributed/kv_events.py``)::

    [ topic (utf-8) | seq (8 bytes, big-endian, unsigned) | payload (msgpack) ]

``seq`` counts up from 0 *per topic* of each publisher. (vLLM numbers all of a
publisher's messages together; with one topic per publisher, as there, the two agree.
Counting per topic lets a subscriber that filters topics still spot real gaps, and know
how many of a topic's messages never reached it: ``Subscriber.lost``.)

NOTE: a PUB socket never blocks and never waits for a slow subscriber: once a
subscriber's queue reaches the high-water mark (``hwm`` messages, on each side), new
messages for it are *dropped*. Messages sent before a subscriber has connected and
subscribed are lost as well (the "slow joiner"). ``Subscriber`` notices drops from the
gaps in ``seq`` and counts them in ``missed``; ``lost(topic)`` adds those a topic sent
before the first one that arrived (the slow joiner's, seen from the seq of that first
one). A consumer that must not miss anything (a router mirroring a KV cache) then
resynchronises, e.g. by asking for a snapshot.

On a tcp:// address, with the launch's keys (``keys``, or the process default), the
publisher is a CURVE server that admits only the launch's subscribers
(``modkit.transport.security``); on ipc:// the 0700 directory is the only lock.

Timeouts: ``Subscriber.recv(timeout_s)`` returns None when nothing arrives in time, so a
loop that also serves RPC or checks its parent never blocks on a quiet publisher.

Nobody listening costs nothing: the publisher's socket is an XPUB, which hears each topic
prefix as its first subscriber subscribes and its last one leaves. ``Publisher.wants(topic)``
answers whether anyone would receive a message on ``topic`` now, so a component can skip
*building* an event nobody would get (ZeroMQ drops such a message at the publisher anyway).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

import zmq

from modkit.protocol import LaunchKeys
from modkit.transport import security
from modkit.transport.codec import DecodeError, Decoder, encode
from modkit.transport.rpc import new_socket

log = logging.getLogger(__name__)
DEFAULT_HWM = 10_000  # messages queued per subscriber (on each side) before PUB drops


class Delivery(NamedTuple):
    """One received message; unpacks as ``topic, seq, payload``."""

    topic: str
    seq: int
    payload: Any


class Publisher:
    """Binds a PUB socket on ``address`` (``address`` attribute: the real endpoint) and numbers what it sends."""

    def __init__(
        self,
        address: str,
        *,
        hwm: int = DEFAULT_HWM,
        allow_remote: bool = False,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        keys: LaunchKeys | None = None,
    ) -> None:
        self.socket = new_socket(zmq.XPUB, ctx)  # a PUB that tells which topics are subscribed
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        keys = security.keys_or_default(keys)
        self.address: str = security.bind(self.socket, address, keys, allow_remote=allow_remote)
        self._next_seq: dict[str, int] = {}
        self._prefixes: set[bytes] = set()  # the topic prefixes at least one subscriber holds
        self._wanted: dict[str, bool] = {}  # wants() per topic, until the subscriptions change

    def wants(self, topic: str) -> bool:
        """Whether a message on ``topic`` would reach any subscriber now (else ``publish`` would be dropped)."""
        self._read_subscriptions()
        wanted = self._wanted.get(topic)
        if wanted is None:
            name = topic.encode()
            wanted = self._wanted[topic] = any(name.startswith(prefix) for prefix in self._prefixes)
        return wanted

    def _read_subscriptions(self) -> None:
        """Take in the (un)subscriptions that arrived: one frame each, 1 or 0 then the prefix."""
        while True:
            try:
                frame = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frame[:1] == b"\x01":
                self._prefixes.add(frame[1:])
            elif frame[:1] == b"\x00":
                self._prefixes.discard(frame[1:])
            self._wanted.clear()

    def publish(self, topic: str, payload: Any) -> int:
        """Send ``payload`` (msgpack-able) on ``topic``; return its seq. Never blocks; may drop (see module doc)."""
        seq = self._next_seq.get(topic, 0)
        self._next_seq[topic] = seq + 1
        self.socket.send_multipart([topic.encode(), seq.to_bytes(8, "big"), encode(payload)])
        return seq

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Subscriber:
    """Connects a SUB socket to ``address`` for ``topics`` (prefixes; "" means all) and counts missed messages.

    ``payload_type`` is what payloads decode to (a Struct, a tagged union, or ``Any`` for
    plain builtins). ``missed`` totals the seq gaps seen; ``last_seq`` and ``received`` are
    per topic. ``missed`` counts from the first message it sees on each topic; ``lost``
    also counts the messages sent before it.
    """

    def __init__(
        self,
        address: str,
        topics: Iterable[str] = ("",),
        *,
        payload_type: Any = Any,
        hwm: int = DEFAULT_HWM,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        keys: LaunchKeys | None = None,
    ) -> None:
        self.address = address
        self.keys = security.keys_or_default(keys)
        self.socket = new_socket(zmq.SUB, ctx)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        for topic in topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        security.connect(self.socket, address, self.keys)
        self.missed = 0
        self.addresses = [address]
        self.last_seq: dict[str, int] = {}
        self.received: dict[str, int] = {}  # per topic, those decoded since its seq last started from 0
        self._decoder: Decoder[Any] = Decoder(payload_type)

    def connect(self, address: str) -> None:
        """Also listen to the publisher at ``address`` (one SUB socket merges many publishers)."""
        security.connect(self.socket, address, self.keys)
        self.addresses.append(address)

    def recv(self, timeout_s: float) -> Delivery | None:
        """The next message, or None if none arrives within ``timeout_s``. Malformed ones are logged and skipped."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if not self.socket.poll(max(0, math.ceil(remaining * 1000)), zmq.POLLIN):
                return None
            delivery = self._parse(self.socket.recv_multipart())
            if delivery is not None:
                return delivery

    def _parse(self, frames: list[bytes]) -> Delivery | None:
        if len(frames) != 3 or len(frames[1]) != 8:
            log.warning("dropped a malformed message of %d frames from %s", len(frames), self.address)
            return None
        topic, seq = frames[0].decode(errors="replace"), int.from_bytes(frames[1], "big")
        last = self.last_seq.get(topic)
        if last is not None and seq > last + 1:
            self.missed += seq - last - 1
            log.info("missed %d message(s) on %r from %s", seq - last - 1, topic, self.address)
        elif last is not None and seq <= last:
            log.info("seq on %r went back from %d to %d: the publisher restarted", topic, last, seq)
            self.received[topic] = 0  # a new publisher's messages: lost() counts against its seq
        self.last_seq[topic] = seq
        try:
            delivery = Delivery(topic, seq, self._decoder.decode(frames[2]))
        except DecodeError as error:
            log.warning("dropped seq %d on %r from %s: %s", seq, topic, self.address, error)
            return None
        self.received[topic] = self.received.get(topic, 0) + 1
        return delivery

    def lost(self, topic: str) -> int:
        """How many of ``topic``'s messages, up to the last one that arrived, never did (or did
        not decode): dropped at the high-water mark, or sent before this subscription arrived.
        (Messages after the last one that arrived are not known of yet.)"""
        last = self.last_seq.get(topic)
        return 0 if last is None else last + 1 - self.received.get(topic, 0)

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
