"""Wire messages: every ``msgspec.Struct`` that crosses from one modkit process to another.

Everything here is encoded with msgpack by ``modkit.transport.codec`` and never with
pickle: a peer can only ever make the receiver build these plain records, not run code.

Each message is a *tagged* Struct: its msgpack map carries ``"type": "<tag>"`` so one
decoder turns a frame back into the right class (``TransportMessage`` below is that
union). Tags are short, stable names; renaming one breaks the wire, renaming the class
does not.

Transport level (used by ``modkit.transport``; components never build these by hand):

==================  =====================================================================
``Call``            client -> server: run ``method(*args, **kwargs)`` on the hosted object
``Reply``           server -> client: the call's result
``ErrorReply``      server -> client: the call raised (or could not be decoded / run)
``Ready``           child -> launcher, once: the object is built and its server is bound
``Heartbeat``       child -> launcher, every interval while its serve loop turns
``ChildSpec``       launcher -> child, once, as JSON on the child's stdin (not a socket)
==================  =====================================================================

Component level: the messages the six pipeline components (frontend, scheduler, workers,
router, KV cache manager, sampler) exchange go *below* the transport section, one block
per component, each a tagged Struct with a comment on every field. Most of them travel
as the arguments and results of RPC calls, which the server converts to the annotated
parameter types of the method it calls; a message that is published (pub/sub) or pushed
needs a tag and a place in a union of its own, built like ``TransportMessage``.
"""

from __future__ import annotations

from typing import Any

import msgspec

# Method names the RPC server answers itself, before looking at the hosted object. They
# contain a dot, so they can never clash with a Python method name.
PING = "rpc.ping"  # answers {"pid": ..., "object": <class name>}: proves the serve loop is turning
SHUTDOWN = "rpc.shutdown"  # answers None, then the serve loop ends (the polite first step of a stop)


# ---------------------------------------------------------------------------------------
# Transport level
# ---------------------------------------------------------------------------------------


class Call(msgspec.Struct, tag="call", frozen=True):
    """Ask the server to run one public method of the object it hosts."""

    req_id: int  # chosen by the client, unique per client socket; the reply carries it back
    method: str  # a public method name (no leading underscore), or PING / SHUTDOWN
    args: list[Any] = []  # msgpack-encodable values: builtins, Structs, dataclasses
    kwargs: dict[str, Any] = {}


class Reply(msgspec.Struct, tag="reply", frozen=True):
    """The result of a ``Call``; the client converts it to the type it expects, if it knows one."""

    req_id: int
    result: Any


class ErrorReply(msgspec.Struct, tag="error", frozen=True):
    """The call raised on the server; the client raises ``RemoteError`` with these fields."""

    req_id: int
    type_name: str  # the exception's class name, e.g. "ValueError"
    message: str  # str(exception)
    traceback: str  # the server-side traceback text, for logs and notebooks


class Ready(msgspec.Struct, tag="ready", frozen=True):
    """Sent once by a child process after its object is built and its RPC server is bound."""

    name: str  # the component name the launcher gave it
    pid: int  # the child's pid, checked against the one the launcher started
    address: str  # the endpoint the RPC server is bound to (the real port if ``:*`` was asked)


class Heartbeat(msgspec.Struct, tag="heartbeat", frozen=True):
    """Sent by a child's serve loop every interval; a stale one means busy or stuck, not dead."""

    name: str
    pid: int
    seq: int  # counts up from 0; the receiver keeps only the newest (CONFLATE)
    # NOTE: time.monotonic() of the sender. CLOCK_MONOTONIC is one clock for the whole host,
    # so the launcher can subtract it from its own; heartbeats never cross machines.
    sent_at: float


class ChildSpec(msgspec.Struct, frozen=True):
    """What ``ComponentProcess.start`` tells its child: one JSON line on the child's stdin.

    Not on the command line, which every local user can read in /proc. The pipe stays
    open afterwards: when it closes, the launcher is gone and the child exits.
    """

    name: str  # the component's name, for logs and Ready
    target: str  # "package.module:Name": a class or factory function, called with kwargs
    kwargs: dict[str, Any]  # JSON values; Structs and dataclasses arrive as objects, rebuilt from annotations
    address: str  # where the child binds its RpcServer
    control_address: str  # the launcher's PULL socket, for Ready
    heartbeat_address: str  # the launcher's PULL socket that keeps only the newest Heartbeat
    allowed_methods: list[str] | None  # None: every public method
    allow_remote: bool  # let ``address`` be a non-loopback TCP address
    heartbeat_interval_s: float
    log_level: str  # "INFO", "DEBUG", ...


TransportMessage = Call | Reply | ErrorReply | Ready | Heartbeat


# ---------------------------------------------------------------------------------------
# Component level: add each component's messages below, one section per component.
# ---------------------------------------------------------------------------------------
