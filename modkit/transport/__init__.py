"""The transport layer: the only code in modkit that imports ZeroMQ.

A component is a plain Python object. ``ComponentProcess.start`` runs it in a child
process behind an ``RpcServer``; callers reach it with an ``RpcClient`` (``call`` or a
typed ``proxy``). Streams that many processes listen to (KV cache events) go through
``Publisher`` / ``Subscriber``. Messages are msgpack (``codec``), never pickle; sockets
bind to a private ipc directory or 127.0.0.1 only (``addresses``). Control calls are
signed with the launch's keys and tcp:// sockets speak CURVE (``security``). The wire
Structs live in ``modkit.protocol``.

::

    launcher                                      child (python -m modkit.transport)
    ComponentProcess.start(name, "pkg.mod:Cls")  --ChildSpec (stdin)-->  Cls(**kwargs)
                        <------------------ Ready (PUSH) --------------  RpcServer(obj).bind
    RpcClient.call("m", x)  ---- Call (DEALER) ------------------------>  obj.m(x)
                            <--- Reply | ErrorReply (ROUTER) ----------
    is_alive()          <------------------ Heartbeat (PUSH) ----------  every interval

The pipeline's data plane is one-way: ``Outbox`` (PUSH) -> ``Inbox`` (PULL) carrying
``modkit.protocol.PipelineMessage``s (``channels``), and ``serve`` is the loop every
component process runs, with its ``/health`` HTTP port.
"""

from modkit.transport.addresses import (
    InsecureAddressError,
    check_bind_address,
    free_tcp_port,
    free_tcp_ports,
    ipc_address,
    run_dir,
    tcp_address,
)
from modkit.transport.channels import AsyncInbox, Beacon, ChannelFullError, Inbox, Outbox
from modkit.transport.codec import DecodeError, Decoder, decode, encode
from modkit.transport.process import QUIET_THREADS, ComponentProcess, ComponentStartError
from modkit.transport.pubsub import Delivery, Publisher, Subscriber
from modkit.transport.rpc import RemoteError, RpcClient, RpcServer, RpcTimeoutError

__all__ = [
    "QUIET_THREADS",
    "AsyncInbox",
    "Beacon",
    "ChannelFullError",
    "ComponentProcess",
    "ComponentStartError",
    "DecodeError",
    "Decoder",
    "Delivery",
    "Inbox",
    "InsecureAddressError",
    "Outbox",
    "Publisher",
    "RemoteError",
    "RpcClient",
    "RpcServer",
    "RpcTimeoutError",
    "Subscriber",
    "check_bind_address",
    "decode",
    "encode",
    "free_tcp_port",
    "free_tcp_ports",
    "ipc_address",
    "run_dir",
    "tcp_address",
]
