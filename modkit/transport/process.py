"""Run one component in its own process, served over RPC: start, watch, stop.

``ComponentProcess.start`` launches ``python -m modkit.transport`` (see ``__main__.py``)
and writes a ``ChildSpec`` as one JSON line to its stdin: no pickling, and nothing
secret on the command line. The spec carries the launch's keys (``LaunchKeys``, see
``modkit.transport.security``): the child signs its calls and checks the calls it
serves with them, and ``client()`` here signs with the same keys. The child imports ``target`` ("package.module:Name"),
builds the object from ``kwargs``, serves it with ``RpcServer`` and reports back over
two sockets the launcher binds next to the child's::

    child PUSH --[ Ready ]------> launcher PULL "<name>.control"     once, when serving
    child PUSH --[ Heartbeat ]--> launcher PULL "<name>.heartbeat"   every interval; CONFLATE
                                                                      keeps only the newest

Timeouts, and why each exists:

- ``ready_timeout_s``: building a component can be slow (loading a model), but a child
  that hangs must not hang the launcher; it is killed and ``ComponentStartError`` shows
  the last lines of its log. A child that dies early is noticed at once, not at the end.
- ``heartbeat_timeout_s``: the child's serve loop sends a heartbeat every
  ``heartbeat_interval_s``. A live process with a stale heartbeat is *unresponsive*
  (busy in a long call, or stuck), which is not the same as *exited*.
- ``stop(timeout_s)``: ask politely (a SHUTDOWN call), then SIGTERM, then SIGKILL, waiting
  up to ``timeout_s`` at each step, so a stuck child cannot keep the launcher waiting.

If the launcher dies (even by SIGKILL), the child sees its stdin pipe close and exits
by itself; it also checks ``os.getppid()``. (PR_SET_PDEATHSIG is not used: it fires
when the launching *thread* exits, which would kill children started from a thread.)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NoReturn

import msgspec
import zmq

from modkit.protocol import ChildSpec, Heartbeat, LaunchKeys, Ready
from modkit.transport.addresses import check_bind_address, ipc_address, remove_ipc_file
from modkit.transport.codec import DecodeError, decode
from modkit.transport.rpc import RemoteError, RpcClient, RpcTimeoutError, new_socket
from modkit.transport.rundirs import LOG_DIR_PREFIX, private_file, write_owner
from modkit.transport.security import new_launch_keys

# For components that do no tensor work: one thread, and no OpenMP spin-waiting, which
# takes cores from a busy torch process beside it (the worker needs those cores).
QUIET_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
LOG_TAIL_LINES = 20

_log_dir: Path | None = None


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container or ``taskset`` may allow fewer)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class ComponentStartError(RuntimeError):
    """The child exited or timed out before it was ready; the message ends with its last log lines."""


def default_log_dir() -> Path:
    """This launch's log directory (mode 0700); kept after exit so logs can be read later (a day
    after a crash, then swept: ``rundirs.sweep_stale_dirs``)."""
    global _log_dir
    if _log_dir is None:
        _log_dir = Path(tempfile.mkdtemp(prefix=LOG_DIR_PREFIX))
        write_owner(_log_dir)
    return _log_dir


def _new_log_path(log_dir: Path, name: str) -> Path:
    """``<name>.log``, or ``<name>.1.log``... if a component of that name already ran in this launch."""
    path, n = log_dir / f"{name}.log", 0
    while path.exists():
        n += 1
        path = log_dir / f"{name}.{n}.log"
    return path


class ComponentProcess:
    """A running child process that serves one object; build it with ``start``."""

    pid: int
    _popen: subprocess.Popen[bytes]

    def __init__(self, spec: ChildSpec, log_path: Path, heartbeat_timeout_s: float) -> None:
        """Bind the sockets the child reports to; ``start`` then launches the child."""
        self.name, self.address, self.log_path = spec.name, spec.address, log_path
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.spec = spec
        self._control = new_socket(zmq.PULL)
        self._control.bind(spec.control_address)
        self._heartbeats = new_socket(zmq.PULL)
        self._heartbeats.setsockopt(zmq.CONFLATE, 1)  # set before bind: only the newest heartbeat is kept
        self._heartbeats.bind(spec.heartbeat_address)
        self._heartbeats_lock = threading.Lock()  # state() is asked from several threads (the supervisor)
        self._last_beat = time.monotonic()  # until the first heartbeat, age counts from the start

    @classmethod
    def start(
        cls,
        name: str,
        target: str,
        kwargs: dict[str, Any] | None = None,
        address: str | None = None,
        *,
        env: dict[str, str] | None = None,
        allowed_methods: list[str] | None = None,
        allow_remote: bool = False,
        log_dir: Path | None = None,
        ready_timeout_s: float = 60.0,
        heartbeat_interval_s: float = 0.5,
        heartbeat_timeout_s: float = 5.0,
        log_level: str = "INFO",
        http_port: int | None = None,
        http_host: str = "127.0.0.1",
        http_api_key: str | None = None,
        keys: LaunchKeys | None = None,
        cancel: threading.Event | None = None,
    ) -> ComponentProcess:
        """Launch ``target(**kwargs)`` in a child serving on ``address`` (default: a private ipc path).

        ``kwargs`` must be JSON-encodable; Struct and dataclass values are rebuilt in the child
        from ``target``'s annotations. ``env`` is added to this process's environment for the
        child (e.g. QUIET_THREADS, PYTHONPATH). With ``http_port`` the child also answers
        ``GET /health`` and ``GET /stats`` there (``modkit.transport.serve``); with
        ``http_api_key``, ``/stats`` asks for it as a bearer token. ``keys``: the launch's
        (components that talk to each other must share them); None makes fresh ones for
        this child alone. Setting
        ``cancel`` (from another thread) stops a start that is still waiting. Returns once the child sent Ready; raises
        ComponentStartError (with the child's last log lines) otherwise.
        """
        if ":" not in target:  # the rest is checked by the child's import
            raise ValueError(f"target must look like 'package.module:Name', got {target!r}")
        spec = ChildSpec(
            name=name,
            target=target,
            kwargs=kwargs or {},
            address=check_bind_address(address or ipc_address(name), allow_remote=allow_remote),
            control_address=ipc_address(f"{name}.control"),
            heartbeat_address=ipc_address(f"{name}.heartbeat"),
            allowed_methods=allowed_methods,
            allow_remote=allow_remote,
            heartbeat_interval_s=heartbeat_interval_s,
            log_level=log_level,
            http_port=http_port,
            http_host=http_host,
            http_api_key=http_api_key,
            keys=keys if keys is not None else new_launch_keys(),
        )
        line = msgspec.json.encode(spec) + b"\n"  # TypeError here if kwargs are not JSON values
        proc = cls(spec, _new_log_path(log_dir or default_log_dir(), name), heartbeat_timeout_s)
        with private_file(proc.log_path) as log_file, proc._closing_on_error():  # the child keeps its own fd
            proc._popen = subprocess.Popen(
                [sys.executable, "-m", "modkit.transport"],
                stdin=subprocess.PIPE,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True,  # a Ctrl-C in the launcher's terminal is the launcher's to handle
            )
        proc.pid = proc._popen.pid
        assert proc._popen.stdin is not None
        try:
            with contextlib.suppress(BrokenPipeError):  # a child that died at once is reported below
                proc._popen.stdin.write(line)
                proc._popen.stdin.flush()  # NOTE: never closed while the child runs: that means "launcher gone"
            proc._wait_ready(ready_timeout_s, cancel)
        except BaseException:
            proc.stop(timeout_s=1.0)
            raise
        return proc

    def _wait_ready(self, timeout_s: float, cancel: threading.Event | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                self._fail("was cancelled before it was ready")
            if self._popen.poll() is not None:
                self._fail(f"exited with code {self._popen.returncode} before it was ready")
            if not self._control.poll(100, zmq.POLLIN):  # short, so an early death is noticed quickly
                continue
            try:
                message = decode(self._control.recv())
            except DecodeError:
                continue
            if isinstance(message, Ready) and message.pid == self.pid:
                self.address = message.address  # the real port when tcp://127.0.0.1:* was asked
                self._last_beat = time.monotonic()
                return
        self._fail(f"was not ready within {timeout_s:g} s")

    def _fail(self, what: str) -> NoReturn:
        header = f"component {self.name!r} (pid {self.pid}) {what}; last lines of {self.log_path}:"
        raise ComponentStartError(header + "\n" + self.log_tail())

    def client(self, timeout_s: float = 5.0) -> RpcClient:
        """A new RPC client for this component, signing with its keys (the caller closes it)."""
        return RpcClient(self.address, timeout_s, keys=self.spec.keys)

    def heartbeat_age(self) -> float:
        """Seconds since the child's serve loop last reported (since start, before the first report)."""
        with self._heartbeats_lock:
            while not self._heartbeats.closed and self._heartbeats.poll(0, zmq.POLLIN):
                try:
                    beat = decode(self._heartbeats.recv())
                except DecodeError:
                    continue
                if isinstance(beat, Heartbeat):
                    self._last_beat = max(self._last_beat, beat.sent_at)
        return time.monotonic() - self._last_beat

    def state(self) -> Literal["running", "unresponsive", "exited"]:
        """exited: the process is gone; unresponsive: alive but its heartbeat is stale; else running."""
        if self._popen.poll() is not None:
            return "exited"
        return "running" if self.heartbeat_age() <= self.heartbeat_timeout_s else "unresponsive"

    def is_alive(self) -> bool:
        """The process runs and its serve loop reported within ``heartbeat_timeout_s``."""
        return self.state() == "running"

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the child's stdout and stderr."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 5.0) -> int:
        """Shutdown call, then SIGTERM, then SIGKILL, each given ``timeout_s``; close sockets, remove socket files.

        Returns the exit code: 0 after a polite shutdown, 143 (128 + SIGTERM) or -9 otherwise.
        """
        if self._popen.poll() is None:
            deadline = time.monotonic() + timeout_s
            with self.client() as rpc, contextlib.suppress(RpcTimeoutError, RemoteError):
                rpc.shutdown(timeout_s=min(1.0, timeout_s))
            for escalate in (self._popen.terminate, self._popen.kill, None):
                try:
                    self._popen.wait(max(0.0, deadline - time.monotonic()))
                    break
                except subprocess.TimeoutExpired:
                    if escalate is not None:
                        escalate()
                        deadline = time.monotonic() + timeout_s
        returncode = self._popen.wait()
        if self._popen.stdin is not None:
            self._popen.stdin.close()
        self._close_sockets()
        return returncode

    def _close_sockets(self) -> None:
        self._control.close(linger=0)
        with self._heartbeats_lock:
            self._heartbeats.close(linger=0)
        for address in (self.address, self.spec.control_address, self.spec.heartbeat_address):
            remove_ipc_file(address)  # a killed child cannot remove its own

    @contextlib.contextmanager
    def _closing_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:  # e.g. Popen failed: no child will ever use these sockets
            self._close_sockets()
            raise

    def __enter__(self) -> ComponentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ComponentProcess({self.name!r}, pid={self.pid}, address={self.address!r}, {self.state()})"
