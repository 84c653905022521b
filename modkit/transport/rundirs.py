"""The private directories a launch makes, and the sweep that removes those of dead launches.

A launcher makes up to three directories under the temporary directory, each mode 0700::

    modkit-<random>        control and heartbeat sockets of its children (``addresses.run_dir``)
    modkit-ipc-<random>    a pipeline's sockets (``PipelineAddresses.fresh``)
    modkit-logs-<random>   its children's logs (``process.default_log_dir``)

and a prefill worker with the ``shm`` KV connector makes ``modkit-kv-<random>`` for the files
it shares, in ``shared_memory_parent()`` (``/dev/shm`` where there is one).

Each holds an owner file, ``launcher.json``: the launcher's pid and the start time the
kernel gives that process. A launcher that exits normally removes its socket directories;
one that was killed (SIGKILL, the OOM killer) cannot. ``sweep_stale_dirs``, which every
``Pipeline.launch`` runs, removes those left behind:

- only directories with an owner file (made by this code), owned by this user, whose
  launcher is gone: no process with that pid, or one that started at another time (the
  pid was reused), or a zombie;
- socket directories at once (nothing can use them any more);
- log directories once their newest file is a day old: the logs of a crash are what one
  reads to find out what happened.

``make_private_dir`` and ``private_file`` keep what a launch writes to this user alone:
every directory it makes is 0700 (the missing parents too), every file 0600.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

OWNER_FILE = "launcher.json"
SOCKET_DIR_PREFIXES = ("modkit-ipc-", "modkit-")  # run_dir's prefix is the bare "modkit-"
LOG_DIR_PREFIX = "modkit-logs-"
KEEP_LOGS_S = 24 * 3600.0  # a dead launch's logs stay this long after their last line


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat``); None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # NOTE: the command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat.rpartition(")")[2].split()
    return int(fields[19])  # field 22, starttime; fields[0] is field 3, the state


def write_owner(directory: Path) -> None:
    """Name this process as the launcher that owns ``directory``."""
    owner = {"pid": os.getpid(), "start_time": process_start_time(os.getpid())}
    with private_file(directory / OWNER_FILE) as f:
        f.write(json.dumps(owner).encode())


def launcher_alive(directory: Path) -> bool:
    """Whether the launcher named in ``directory``'s owner file still runs (True if it cannot be read)."""
    try:
        owner = json.loads((directory / OWNER_FILE).read_text())
        pid, start_time = int(owner["pid"]), owner["start_time"]
    except (OSError, ValueError, KeyError, TypeError):
        return True  # not ours to judge: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a process of another user: the start time below tells whether it is ours
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True  # no /proc (macOS): a live pid is all there is to go on
    return state != "Z" and process_start_time(pid) == start_time


def shared_memory_parent() -> Path:
    """Where files meant to be mapped by several processes go: ``/dev/shm`` (memory, not a disk)
    where this system has one, else the temporary directory."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else Path(tempfile.gettempdir())


def sweep_stale_dirs(parent: Path | None = None) -> list[Path]:
    """Remove the socket and log directories of dead launchers under ``parent`` (by default the
    temporary directory and ``shared_memory_parent()``), by the rules in the module docstring;
    returns those removed."""
    if parent is None:
        parents = {Path(tempfile.gettempdir()), shared_memory_parent()}
        return [path for one in sorted(parents) for path in sweep_stale_dirs(one)]
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(SOCKET_DIR_PREFIXES) or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        try:
            mine = entry.stat(follow_symlinks=False).st_uid == os.getuid()
        except OSError:
            continue
        if not mine or not (path / OWNER_FILE).is_file() or launcher_alive(path):
            continue
        if entry.name.startswith(LOG_DIR_PREFIX) and time.time() - newest_mtime(path) < KEEP_LOGS_S:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def newest_mtime(directory: Path) -> float:
    """The last time anything in ``directory`` (or the directory itself) changed."""
    times = [directory.stat().st_mtime]
    for entry in os.scandir(directory):
        times.append(entry.stat(follow_symlinks=False).st_mtime)
    return max(times)


def make_private_dir(path: Path) -> Path:
    """``path`` made if missing, with mode 0700, and so is each missing parent. A directory that
    exists already keeps its mode (it is the user's own choice)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):  # the outermost first
        directory.mkdir(mode=0o700, exist_ok=True)
        directory.chmod(0o700)  # mkdir's mode is masked by the umask; 0700 is what is meant
    return path


def private_file(path: Path) -> BinaryIO:
    """``open(path, "wb")``; a file it makes has mode 0600 (this user's only)."""
    return open(path, "wb", opener=lambda p, flags: os.open(p, flags, 0o600))
