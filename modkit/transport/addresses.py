"""Where modkit's sockets live: ``ipc://`` files in a private directory, or loopback TCP ports.

An endpoint is one of:

- ``ipc://<path>``: a Unix socket file. The default: ``ipc_address(name)`` puts it in a
  directory made for this launch with mode 0700, so only this user can connect (the file
  system is the authentication). The launcher removes the directory when it exits.
- ``tcp://127.0.0.1:<port>`` (or ``:*``, which lets the OS pick; the server then reports
  the real port): reachable by every local user, but not from other machines; in a
  launch it speaks CURVE with the launch's keys (``modkit.transport.security``).
- ``inproc://<name>``: inside one process (tests, notebooks).

NOTE: binding an internal socket to ``*``, ``0.0.0.0`` or a public interface exposed
vLLM's engines to the network (CVE-2025-30202). ``check_bind_address`` refuses any
non-loopback TCP bind with ``InsecureAddressError`` unless the caller passes
``allow_remote=True``; ``security.bind`` also refuses one without CURVE keys.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import shutil
import socket
import tempfile
from pathlib import Path

from modkit.transport.rundirs import write_owner

MAX_IPC_PATH_BYTES = 107  # sun_path is 108 bytes on Linux, one of them the terminating NUL


class InsecureAddressError(ValueError):
    """A bind to an address other machines could reach, without ``allow_remote=True``."""


_run_dir: Path | None = None
_handed_out: set[str] = set()


def run_dir() -> Path:
    """This launch's private directory (mode 0700) for socket files; removed when the process exits."""
    global _run_dir
    if _run_dir is None:
        _run_dir = Path(tempfile.mkdtemp(prefix="modkit-"))  # mkdtemp creates it with mode 0700
        write_owner(_run_dir)  # if this process is killed, a later launch removes it (rundirs.sweep_stale_dirs)
        atexit.register(shutil.rmtree, _run_dir, ignore_errors=True)
    return _run_dir


def ipc_address(name: str) -> str:
    """A fresh ``ipc://`` endpoint named after ``name`` in ``run_dir()`` (``name.1``... if taken)."""
    if not name or "/" in name:
        raise ValueError(f"an ipc socket name must be non-empty without '/', got {name!r}")
    candidate, n = name, 0
    while candidate in _handed_out or (run_dir() / candidate).exists():
        n += 1
        candidate = f"{name}.{n}"
    _handed_out.add(candidate)
    path = str(run_dir() / candidate)
    if len(path.encode()) > MAX_IPC_PATH_BYTES:
        raise ValueError(f"ipc path {path!r} is longer than {MAX_IPC_PATH_BYTES} bytes; use a shorter name")
    return f"ipc://{path}"


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago. Racy by nature: binding ``tcp://127.0.0.1:*`` is not."""
    return free_tcp_ports(1, host)[0]


def free_tcp_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` different TCP ports that were free a moment ago (racy, as ``free_tcp_port``). Each is
    held until all are picked: one at a time, a port let go may be handed out again at once."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(n):
            probe = held.enter_context(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET))
            probe.bind((host, 0))
            ports.append(int(probe.getsockname()[1]))
        return ports


def tcp_address(port: int | str = "*", host: str = "127.0.0.1") -> str:
    """``tcp://host:port``; the default ``port="*"`` lets the OS pick one when the socket binds."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def split_tcp(address: str) -> tuple[str, str]:
    """``tcp://host:port`` -> (host, port) with IPv6 brackets removed; ValueError if malformed."""
    host, sep, port = address.removeprefix("tcp://").rpartition(":")
    if not address.startswith("tcp://") or not sep or not host or not port:
        raise ValueError(f"expected tcp://<host>:<port>, got {address!r}")
    return host.removeprefix("[").removesuffix("]"), port


def is_loopback(host: str) -> bool:
    """True for localhost and 127.0.0.0/8 or ::1; False for ``*``, ``0.0.0.0`` and interface names."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", "eth0", a host name: could be anything
        return False


def check_bind_address(address: str, *, allow_remote: bool = False) -> str:
    """Return ``address`` if it is safe to bind; raise ``InsecureAddressError`` or ``ValueError``."""
    if address.startswith(("ipc://", "inproc://")):
        if address.startswith("ipc://") and len(address.removeprefix("ipc://").encode()) > MAX_IPC_PATH_BYTES:
            raise ValueError(f"ipc path in {address!r} is longer than {MAX_IPC_PATH_BYTES} bytes")
        return address
    if not address.startswith("tcp://"):
        raise ValueError(f"unsupported endpoint {address!r}: use ipc://, tcp://127.0.0.1:<port> or inproc://")
    host, _ = split_tcp(address)
    if not is_loopback(host) and not allow_remote:
        raise InsecureAddressError(
            f"refusing to bind {address!r}: {host!r} is not a loopback address, so other machines could "
            "connect. Bind tcp://127.0.0.1:<port> or ipc://, or pass allow_remote=True (and use CURVE)."
        )
    return address


def ipc_path(address: str) -> Path | None:
    """The socket file behind an ``ipc://`` endpoint, or None for other transports."""
    return Path(address.removeprefix("ipc://")) if address.startswith("ipc://") else None


def remove_ipc_file(address: str) -> None:
    """Delete the socket file of an ``ipc://`` endpoint if it is still there (after a crash)."""
    path = ipc_path(address)
    if path is not None:
        path.unlink(missing_ok=True)
        if path.parent == _run_dir:
            _handed_out.discard(path.name)
