"""The launcher's process bookkeeping: what each component runs, how a group of them stops.

``Pipeline`` (``launcher.py``) starts components from ``ComponentSpec``s and keeps them
to restart one the same way; ``stop_all`` is also what runs at interpreter exit.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modkit.config import PipelineConfig, cpu_worker_threads
from modkit.transport import QUIET_THREADS, ComponentProcess
from modkit.transport.process import usable_cores
from modkit.transport.rundirs import make_private_dir

READY_TIMEOUT_S = 300.0  # loading a hub model on a slow disk can take minutes
TARGETS = {
    "sampler": "modkit.sampler.service:SamplerService",
    "worker": "modkit.worker.service:WorkerService",
    "kv_cache_manager": "modkit.kvcache.service:KVCacheService",
    "scheduler": "modkit.scheduler.service:SchedulerService",
    "router": "modkit.router.service:RouterService",
    "frontend": "modkit.frontend.service:FrontendService",
}


@dataclass(slots=True)
class ComponentSpec:
    """How to (re)start one component."""

    name: str
    target: str
    kwargs: dict[str, Any]
    http_port: int | None  # None: the component serves HTTP itself (the frontend)
    env: dict[str, str]


def stop_all(processes: dict[str, ComponentProcess], ipc_dir: str, timeout_s: float = 5.0) -> None:
    """The frontend first (no new requests while the rest stop), then every other component at once."""
    if "frontend" in processes:
        processes.pop("frontend").stop(timeout_s)
    rest = [processes.pop(name) for name in list(processes)]
    try:
        with ThreadPoolExecutor(max(1, len(rest))) as pool:
            list(pool.map(lambda p: p.stop(timeout_s), rest))
    except RuntimeError:  # at interpreter exit (the finalizer of a pipeline never shut down) no thread starts
        for process in rest:
            process.stop(timeout_s)
    shutil.rmtree(ipc_dir, ignore_errors=True)


def wait_uninterrupted(futures: list[Future[None]]) -> None:
    """Wait for every future, even through further Ctrl-Cs (each start ends within 0.1 s of its cancel)."""
    while True:
        try:
            wait(futures)
            return
        except KeyboardInterrupt:
            continue


def log_dir_of(config: PipelineConfig) -> Path | None:
    """``log_dir`` if set (made if missing, mode 0700, as are its missing parents); None: each
    launch's own temporary directory."""
    if config.log_dir is None:
        return None
    return make_private_dir(Path(config.log_dir))


def progress_printer(enabled: bool) -> Callable[[str], None]:
    def say(text: str) -> None:
        if enabled:
            sys.stderr.write(text)
            sys.stderr.flush()

    return say


def on_cuda(device: str | None) -> bool:
    """Whether the workers run on a CUDA GPU: asked for, or the default where there is one."""
    if device is not None:
        return device.startswith("cuda")
    import torch

    return torch.cuda.is_available()


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds process ``pid`` has used (user and system, all its threads), from Linux's
    ``/proc``; None where there is none, or the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5), after pid and (comm)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def worker_threads_env(config: PipelineConfig) -> dict[str, str]:
    """The thread settings of each worker process.

    On a GPU, a worker does little tensor work on the host (a step's small input tensors), and
    a pool of spinning OpenMP threads there competes with five busy processes for the cores:
    one quiet thread. On the CPU, the workers share the usable cores, each with its share of
    threads, and a thread that waits sleeps (``OMP_WAIT_POLICY=PASSIVE``), one worker too.

    NOTE: why passive, when the in-process ``LLM`` keeps OpenMP's spinning: between two
    forwards a worker waits for the scheduler, the frontend and the client, other processes
    that need the same cores; and a forward's threads meet at a barrier many times a layer.
    A spinning thread burns its share of a core while it waits, so the kernel's scheduler
    runs it less once anything else wants that core, and every barrier then waits for it:
    several workers on few cores, or one worker on a busy box, then take many times longer
    per forward (docs/benchmarks.md has the figures). Waking a sleeping thread costs too, so a
    worker runs its small steps on one of its threads (``PipelineConfig.cpu_parallel_min_tokens``).
    """
    if on_cuda(config.worker_device(0)):
        return dict(QUIET_THREADS)
    share = str(cpu_worker_threads(usable_cores(), config.num_workers))
    return {"OMP_NUM_THREADS": share, "MKL_NUM_THREADS": share, "OMP_WAIT_POLICY": "PASSIVE"}
