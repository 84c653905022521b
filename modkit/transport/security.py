"""Who may control a component: signed calls, and CURVE on every TCP socket.

Each launch makes one ``LaunchKeys`` (``new_launch_keys``): an HMAC key and two CURVE
key pairs. Only the launcher and the processes it starts hold them; a child reads them
from the ``ChildSpec`` on its stdin (never a command line) and makes them its process
default (``set_process_keys``), so every socket a component opens uses them without its
code passing them around. The launcher side passes them explicitly (``keys=``), since one
notebook process may hold several pipelines. Components started by hand, on one host or
several, read the same kind of keys from a directory (``--keys DIR``, written once by
``python -m modkit keys DIR``: ``modkit.transport.keyfiles``) and make them their default
the same way.

What is protected, and by what:

- **Control calls** (RPC). A client with keys sends ``[Call, HMAC-SHA256(key, Call)]``;
  the ``Call`` carries ``sent_at`` and the client's random ``client_id``, so the MAC
  covers the method, the arguments, the request id (which only grows, per client), the
  time and the client. A server with keys refuses, *before* decoding any argument or
  looking up the method, every call outside ``OPEN_METHODS`` whose MAC is missing or
  wrong, whose ``sent_at`` is more than ``REPLAY_WINDOW_S`` from its own clock, or whose
  request id is not above the last one it took from that client (a replay): the caller
  gets an ``ErrorReply`` naming ``PermissionError``, and nothing runs (a swap by
  ``import_path`` imports nothing). ``OPEN_METHODS`` are the liveness reads (PING, LOOP,
  ``health``, ``stats``) that ``/health`` and ``/stats`` use, and the sampler's ``config``.
- **TCP endpoints** (``PipelineConfig.addresses`` overrides). With keys, every socket that
  binds a ``tcp://`` endpoint, loopback included, is a CURVE server whose ZAP handler
  admits only the launch's client key, and every socket that connects to one is that
  client: a peer without the keys cannot complete the handshake, so it can neither
  call, push into an inbox, nor subscribe, and what travels is encrypted. Loopback TCP
  is CURVE too because every local user can reach it (the attack of issue 19 came from
  another local user over the documented TCP override). Without keys (a component
  started by hand without ``--keys``, a test), a loopback TCP socket is plain and a
  non-loopback one is refused (``InsecureAddressError``), ``allow_remote`` or not.

What is not:

- ``ipc://`` sockets carry no CURVE: their files live in a directory of mode 0700, so
  only this user can connect (``modkit.transport.addresses``). The PUSH/PULL inboxes and
  the event publishers there rely on that alone. The user is the trust boundary: a
  process of the same user can also read the keys out of a child's memory.
- A server started without keys (``python -m modkit.worker`` by hand without ``--keys``,
  ``RpcServer`` in a test) accepts every call, as before; it should listen on ipc:// only.
- CURVE authenticates a launch, not a component: every member holds both key pairs (each
  binds some sockets and connects to others), so any host with the keys directory can
  play any component. Keep the directory on the pipeline's hosts only.
- ``/health`` and ``/stats`` over HTTP are ``modkit.transport.serve``'s: ``/stats``
  asks for the API key when one is set.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from modkit.protocol import LOOP, PING, LaunchKeys
from modkit.transport.addresses import InsecureAddressError, check_bind_address, is_loopback, split_tcp
from modkit.transport.codec import CallFrame

# Answered without a MAC: reads that change nothing. The liveness reads (/health, /stats), and
# "config", which a worker asks the sampler at start: also one started by hand, without keys.
OPEN_METHODS = frozenset({PING, LOOP, "health", "stats", "config"})
REPLAY_WINDOW_S = 60.0  # a signed call is accepted this long (either way) from the server's clock
CLIENT_ID_BYTES = 16
ZAP_DOMAIN = "modkit"

_process_keys: LaunchKeys | None = None


def new_launch_keys() -> LaunchKeys:
    """Fresh keys for one launch: an HMAC key, and a CURVE key pair for servers and one for clients."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    return LaunchKeys(
        secrets.token_hex(32),
        server_public.decode(),
        server_secret.decode(),
        client_public.decode(),
        client_secret.decode(),
    )


def set_process_keys(keys: LaunchKeys | None) -> None:
    """Make ``keys`` what every socket of this process uses when it is given none (a child does this once)."""
    global _process_keys
    _process_keys = keys


def keys_or_default(keys: LaunchKeys | None) -> LaunchKeys | None:
    """``keys``, or this process's default if None (which is None outside a launched child)."""
    return keys if keys is not None else _process_keys


# -- signed calls ---------------------------------------------------------------------------


def new_client_id() -> bytes:
    """A client's random id: with its growing request ids, it names each of its signed calls once."""
    return secrets.token_bytes(CLIENT_ID_BYTES)


def mac(frame: bytes, keys: LaunchKeys) -> bytes:
    """HMAC-SHA256 of an encoded ``Call`` under the launch's key."""
    return hmac.digest(bytes.fromhex(keys.secret), frame, hashlib.sha256)


class CallGuard:
    """A server's check of each call: signed under its keys, recent, and not seen before."""

    def __init__(self, keys: LaunchKeys) -> None:
        self._key = bytes.fromhex(keys.secret)
        self._last: dict[bytes, tuple[int, float]] = {}  # client_id -> (highest req_id taken, time.monotonic())
        self._next_sweep = time.monotonic() + REPLAY_WINDOW_S

    def check(self, call: CallFrame, frame: bytes, signature: bytes | None) -> None:
        """Return if ``call`` (decoded from ``frame``) may run; raise ``PermissionError`` saying why if not."""
        method = call.method
        if method in OPEN_METHODS:
            return
        if signature is None:
            raise PermissionError(f"{method!r} needs a signed call: this server takes control calls from its launch")
        if not hmac.compare_digest(hmac.digest(self._key, frame, hashlib.sha256), signature):
            raise PermissionError(f"{method!r}: the call's signature does not verify under this launch's key")
        if abs(time.time() - call.sent_at) > REPLAY_WINDOW_S:
            raise PermissionError(f"{method!r}: the call was signed {time.time() - call.sent_at:.0f} s ago: stale")
        last = self._last.get(call.client_id)
        if len(call.client_id) != CLIENT_ID_BYTES or (last is not None and call.req_id <= last[0]):
            raise PermissionError(f"{method!r}: request {call.req_id} of this client was taken before: a replay")
        now = time.monotonic()
        self._last[call.client_id] = (call.req_id, now)
        if now > self._next_sweep:
            self._forget_quiet_clients(now)

    def _forget_quiet_clients(self, now: float) -> None:
        # NOTE: a client quiet for twice the window is forgotten: every call it signed is
        # older than its last one, so by now each would be refused as stale anyway.
        self._last = {c: seen for c, seen in self._last.items() if now - seen[1] < 2 * REPLAY_WINDOW_S}
        self._next_sweep = now + REPLAY_WINDOW_S


# -- CURVE on TCP ----------------------------------------------------------------------------


def bind(sock: zmq.Socket[Any], address: str, keys: LaunchKeys | None, *, allow_remote: bool = False) -> str:
    """Bind ``sock``: on ``tcp://`` with keys, as a CURVE server admitting only the launch's client key.

    Raises ``InsecureAddressError`` for a non-loopback TCP address without ``allow_remote``
    or without keys. Returns the bound endpoint (the real port when ``:*`` was asked).
    """
    check_bind_address(address, allow_remote=allow_remote)
    if address.startswith("tcp://"):
        host, _ = split_tcp(address)
        if keys is not None:
            _start_zap(sock.context, keys)
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, keys.server_secret.encode())
            sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.server_public.encode())
            sock.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        elif not is_loopback(host):
            raise InsecureAddressError(
                f"refusing to bind {address!r} without CURVE keys: a plain TCP socket beyond loopback lets anyone "
                "who reaches it send messages; start it from a launch (which makes keys)"
            )
    sock.bind(address)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def connect(sock: zmq.Socket[Any], address: str, keys: LaunchKeys | None) -> None:
    """Connect ``sock``: to ``tcp://`` with keys as the launch's CURVE client, otherwise in the clear.

    NOTE: ZeroMQ reads the security options when ``connect`` is called, so one socket (a
    SUB merging many publishers) can hold CURVE connections and ipc ones side by side.
    """
    if address.startswith("tcp://") and keys is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public.encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.client_public.encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.client_secret.encode())
    else:
        sock.setsockopt(zmq.CURVE_SERVER, 0)  # back to no security mechanism for this connection
    sock.connect(address)


class _AllowedClients:
    """The ZAP handler's test: a CURVE client is admitted if its public key is one of the launch's."""

    def __init__(self) -> None:
        self.keys: set[bytes] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        return domain == ZAP_DOMAIN and key in self.keys


_authenticators: dict[int, tuple[ThreadAuthenticator, _AllowedClients]] = {}
_zap_lock = threading.Lock()


def _start_zap(ctx: zmq.Context[Any], keys: LaunchKeys) -> None:
    """Run a ZAP handler (one thread per ZeroMQ context) that admits ``keys``' client."""
    with _zap_lock:
        found = _authenticators.get(ctx.underlying)
        if found is None:
            auth = ThreadAuthenticator(zmq.Context.shadow(ctx.underlying))  # sync sockets, also for an asyncio context
            auth.start()
            allowed = _AllowedClients()
            auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=allowed)
            found = _authenticators[ctx.underlying] = (auth, allowed)
        found[1].keys.add(keys.client_public.encode())


def stop_authenticator(ctx: zmq.Context[Any]) -> None:
    """Stop the ZAP handler of ``ctx``, if one runs (before the context is terminated: it holds a socket)."""
    with _zap_lock:
        found = _authenticators.pop(ctx.underlying, None)
    if found is not None:
        found[0].stop()


def stop_authenticators() -> None:
    """Stop every ZAP handler this process started (before its contexts are destroyed)."""
    with _zap_lock:
        found = list(_authenticators.values())
        _authenticators.clear()
    for auth, _ in found:
        auth.stop()
