"""Subscribing to a pipeline's event stream: ``EventStream`` (live) and ``Recorder`` (kept).

::

    scheduler.ev  worker-i.ev  kv.events  frontend.ev      (PUB, one per publishing component)
          \\            |           |          /
           +------ one SUB socket: EventStream ----+-- recv() / iteration: the events, in arrival order
                                                   +-- Recorder: a thread appending them to a Trace

Subscribing is not instant: ZeroMQ drops what a publisher sends before it has heard of a
subscriber. ``EventStream`` therefore asks each publisher, over RPC, to publish a
``Hello`` with a token of its own, and returns only once every ``Hello`` arrived, so
that nothing published after it returns is lost to the slow-joiner gap. Later losses
(a subscriber too slow for the high-water mark) show up in ``missed``.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from modkit.protocol import LaunchKeys
from modkit.trace.events import TOPICS, Hello, PipelineEvent
from modkit.trace.trace import Trace, event_time
from modkit.transport import RemoteError, RpcClient, RpcTimeoutError, Subscriber

HANDSHAKE_TIMEOUT_S = 10.0
MARK_TIMEOUT_S = 2.0  # a publisher that does not answer announce_events this soon is not waited for (mark)
BATCH_S = 0.05  # the recorder takes what arrived at most this often


class EventStream:
    """Every event of the publishers in ``endpoints`` ({component: (events address, rpc address)}).

    ``keys``: the launch's (``Pipeline.keys``), to sign the handshake's calls and reach
    publishers on tcp:// over CURVE.
    """

    def __init__(
        self,
        endpoints: Mapping[str, tuple[str, str]],
        timeout_s: float = HANDSHAKE_TIMEOUT_S,
        *,
        keys: LaunchKeys | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("no publishers to subscribe to")
        addresses = list(dict.fromkeys(events for events, _ in endpoints.values()))
        self.endpoints, self.keys = dict(endpoints), keys
        self._marks: dict[str, set[str]] = {}  # token -> components whose Hello with it has not come yet
        self._marks_done = threading.Condition()
        self._hellos_read: list[Hello] = []  # read by recv, not yet confirmed by the reader
        self._unanswered: dict[str, set[str]] = {}  # token -> components whose announce_events call failed
        self.subscriber = Subscriber(addresses[0], TOPICS, payload_type=PipelineEvent, keys=keys)
        for address in addresses[1:]:
            self.subscriber.connect(address)
        self._early: collections.deque[PipelineEvent] = collections.deque()  # arrived during the handshake
        try:
            self._handshake(endpoints, timeout_s)
        except BaseException:
            self.subscriber.close()
            raise

    def _handshake(self, endpoints: Mapping[str, tuple[str, str]], timeout_s: float) -> None:
        token = uuid.uuid4().hex
        pending = set(endpoints)
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Hello from {sorted(pending)} within {timeout_s:g} s: are they running?")
            self._announce(sorted(pending), token, timeout_s)
            until = time.monotonic() + 0.2
            while pending and (remaining := until - time.monotonic()) > 0:
                delivery = self.subscriber.recv(remaining)
                if delivery is None:
                    break
                event = delivery.payload
                if isinstance(event, Hello):
                    if event.token == token:
                        pending.discard(event.component)
                else:
                    self._early.append(event)

    def _announce(self, components: list[str], token: str, timeout_s: float) -> None:
        for component in components:
            with RpcClient(self.endpoints[component][1], timeout_s=timeout_s, keys=self.keys) as rpc:
                rpc.call("announce_events", token)

    def mark(self, timeout_s: float = MARK_TIMEOUT_S) -> str:
        """Ask every publisher for a ``Hello`` behind what it has published so far; its token.

        A publisher's messages arrive in the order it sent them, so once ``reached(token)``,
        everything published before this call has come in (or was dropped: ``missed``).
        Another thread must be reading the stream and calling ``confirm()`` once it has kept
        what it read (``Recorder`` does). A publisher that does not answer within ``timeout_s``
        (a component that died, or is restarting) is not waited for: ``reached`` names it."""
        token = uuid.uuid4().hex
        with self._marks_done:
            self._marks[token] = set(self.endpoints)
        for component in sorted(self.endpoints):
            try:
                self._announce([component], token, timeout_s)
            except (RpcTimeoutError, RemoteError):
                with self._marks_done:
                    self._marks[token].discard(component)
                    self._unanswered.setdefault(token, set()).add(component)
        return token

    def reached(self, token: str, timeout_s: float) -> set[str]:
        """Wait up to ``timeout_s`` for every publisher's ``Hello`` of ``mark()``'s ``token``; the
        components whose Hello has not come or that did not answer (empty: all in), and forget
        the token."""
        with self._marks_done:
            self._marks_done.wait_for(lambda: not self._marks[token], timeout_s)
            return self._marks.pop(token) | self._unanswered.pop(token, set())

    def _saw_hello(self, hello: Hello) -> None:
        with self._marks_done:
            if hello.token in self._marks:
                self._hellos_read.append(hello)

    def confirm(self) -> None:
        """The reader has kept every event ``recv`` returned so far: the ``Hello`` among them count now."""
        with self._marks_done:
            for hello in self._hellos_read:
                pending = self._marks.get(hello.token)
                if pending is not None:
                    pending.discard(hello.component)
            self._hellos_read.clear()
            self._marks_done.notify_all()

    @property
    def missed(self) -> int:
        """Messages dropped on the way (gaps in the publishers' sequence numbers)."""
        return self.subscriber.missed

    def recv(self, timeout_s: float = 1.0) -> PipelineEvent | None:
        """The next event, or None if none arrives within ``timeout_s``."""
        if self._early:
            return self._early.popleft()
        deadline = time.monotonic() + timeout_s
        while True:  # at least one look, also with timeout_s=0
            delivery = self.subscriber.recv(max(0.0, deadline - time.monotonic()))
            if delivery is None:
                return None
            if not isinstance(delivery.payload, Hello):
                return delivery.payload
            self._saw_hello(delivery.payload)  # a mark()'s, or another subscriber's handshake

    def __iter__(self) -> Iterator[PipelineEvent]:
        """Events as they come, forever (break out of the loop, then ``close()``)."""
        while True:
            event = self.recv(1.0)
            if event is not None:
                yield event

    def close(self) -> None:
        self.subscriber.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Recorder:
    """Keeps every event of a stream, from a thread of its own; ``trace()`` is a snapshot.

    At most ``max_events`` are kept (the oldest go first), so a pipeline left serving for
    days does not grow without bound; ``dropped`` counts what went.
    """

    def __init__(self, stream: EventStream, meta: dict[str, Any], max_events: int = 2_000_000) -> None:
        self.stream = stream
        self.meta = {**meta, "t0": meta.get("t0", time.time())}
        self.max_events = max_events
        self.dropped = 0
        self.last_event_at = time.monotonic()
        self._events: list[PipelineEvent] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="modkit-recorder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                event = self.stream.recv(0.1)
                if event is None:
                    self.stream.confirm()  # a Hello may have come alone
                    continue
                batch = [event]
                while (event := self.stream.recv(0)) is not None:
                    batch.append(event)
                with self._lock:
                    self.last_event_at = time.monotonic()
                    since = self.meta["t0"]  # what happened before a clear() but arrived after it stays out
                    self._events.extend(e for e in batch if event_time(e) >= since)
                    if len(self._events) > self.max_events:
                        excess = len(self._events) - self.max_events
                        del self._events[:excess]
                        self.dropped += excess
                self.stream.confirm()
                # NOTE: wake at most every BATCH_S. A thread that wakes for each message takes the GIL
                # from the notebook's own work each time; the events keep their own time stamps anyway.
                self._stop.wait(BATCH_S)
        finally:
            self.stream.close()

    @property
    def num_events(self) -> int:
        return len(self._events)

    def settle(self, quiet_s: float = 0.1, timeout_s: float = 2.0) -> None:
        """Wait until no event came for ``quiet_s`` (at most ``timeout_s``): the events of what just finished are in."""
        deadline = time.monotonic() + timeout_s
        while (quiet := time.monotonic() - self.last_event_at) < quiet_s and time.monotonic() < deadline:
            time.sleep(quiet_s - quiet)

    def catch_up(self, timeout_s: float = 30.0) -> set[str]:
        """Wait until every event published before this call is recorded (``EventStream.mark``),
        at most ``timeout_s``; the components not caught up with (empty: none).

        NOTE: a quiet spell (``settle``) is not enough. The recorder shares its process with the
        notebook, whose own work (a load generator parsing thousands of streamed chunks a second)
        can keep it seconds behind the pipeline: the events are queued, not lost, but a snapshot
        taken when they stop *arriving* misses them."""
        if not self._thread.is_alive():  # closed: nothing will be recorded any more
            return set(self.stream.endpoints)
        token = self.stream.mark()
        return self.stream.reached(token, timeout_s)

    def trace(self) -> Trace:
        """Everything recorded so far (since launch, or the last ``clear``)."""
        with self._lock:
            events = list(self._events)
        return Trace(events, {**self.meta, "missed": self.stream.missed, "dropped": self.dropped})

    def clear(self) -> None:
        """Forget what was recorded; the next trace starts now."""
        with self._lock:
            self._events.clear()
            self.meta["t0"] = time.time()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
