"""The ranks of a tensor-parallel worker: starting them, giving them each step, stopping them.

A worker with ``tensor_parallel_size`` N is N processes, one per device, each holding 1/N of
the weights and of the KV heads (``modkit.model.parallel``)::

    rank 0   the worker as it is with N = 1 (the LLM's own process, or the pipeline's worker-i):
             takes the scheduler's plans, prepares each step's inputs, samples, reports.
             Starts ranks 1..N-1: python -m modkit.worker.tensor_parallel, a JSON spec on stdin.
    rank r   loads its slice of the checkpoint, allocates its KV cache (the same block ids),
             then, for each step:
                 a header line on stdin       {"num_tokens": T, "num_seqs": S, "width": W}
                 the inputs                   torch.distributed.broadcast from rank 0, one int64 tensor
                 the same forward             its heads, its KV cache; two all-reduces a layer
             and no logits: only rank 0 samples.

All N join one ``torch.distributed`` process group: NCCL on CUDA devices, gloo on the CPU (on
the loopback interface). They meet through a ``FileStore`` in this process's private 0700
directory (``modkit.transport.addresses.run_dir``), so the rendezvous opens no port. NOTE:
gloo's and NCCL's own connections are TCP on loopback with no authentication (torch.distributed
has none), the one exception to CURVE on every TCP socket (docs/architecture.md). Setting up
(loading, sizing the KV cache) runs the same code on every rank, so their collectives match:
each rank sizes its cache, and all take the smallest number of blocks.

Lifetimes: a rank lives as long as its stdin pipe. Rank 0 closing it (``close``), or dying,
ends the rank. A rank that dies makes rank 0's next step raise ``RankDied``: it is checked
before each step, and a collective that fails mid-step because a peer is gone says so too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

from modkit.attention import AttentionMetadata
from modkit.engine.config import ConfigError, EngineConfig
from modkit.model import load_model
from modkit.model.config import ModelConfig
from modkit.model.decoder import CausalLM
from modkit.model.parallel import TensorParallel
from modkit.worker.kv_cache import PagedKVCache
from modkit.worker.model_runner import ForwardInputs

# How long a collective may wait for a peer. Long enough for a slow rank to load its weights;
# a rank that dies is noticed sooner (RankDied), this only bounds what is not noticed.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
JOIN_POLL_S = 0.5  # how often rank 0 looks at its ranks while they start


class RankDied(RuntimeError):
    """A tensor-parallel rank exited: the worker cannot compute a step any more."""


def check_tensor_parallel(size: int, model: ModelConfig, device: str | None) -> None:
    """Refuse, with a ConfigError naming ``tensor_parallel_size``, a size that cannot work:
    heads, KV heads or the MLP width not divisible by it, more ranks than CUDA devices, or a
    device torch.distributed has no backend for (mps)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError("tensor_parallel_size", f"must be an integer >= 1, got {size!r}")
    if size == 1:
        return
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        total = getattr(model, name)
        if total % size != 0:
            raise ConfigError(
                "tensor_parallel_size",
                f"({size}) must divide the model's {name} ({total}): each rank holds {name} / tensor_parallel_size",
            )
    kind, _, index = (device or ("cuda" if torch.cuda.is_available() else "cpu")).partition(":")
    if kind == "mps":
        raise ConfigError("tensor_parallel_size", f"({size}) > 1 needs CUDA devices or the CPU, got device {device!r}")
    if kind == "cuda":
        first, available = int(index or 0), torch.cuda.device_count()
        if first + size > available:
            raise ConfigError(
                "tensor_parallel_size",
                f"({size}) needs cuda:{first} .. cuda:{first + size - 1}, but {available} CUDA device(s) are visible",
            )


def rank_device(device: str | None, rank: int) -> str:
    """The device of ``rank``: ``cuda:k`` for rank 0 means ``cuda:k+rank``; the CPU is shared."""
    kind, _, index = (device or ("cuda" if torch.cuda.is_available() else "cpu")).partition(":")
    return f"cuda:{int(index or 0) + rank}" if kind == "cuda" else kind


def _join_group(store: dist.Store, rank: int, size: int, device: str) -> None:
    """Join the default process group: NCCL between CUDA devices, gloo on loopback for the CPU."""
    loopback = _loopback_interface()
    os.environ["GLOO_SOCKET_IFNAME"] = loopback  # gloo's and NCCL's own sockets: loopback only
    os.environ["NCCL_SOCKET_IFNAME"] = loopback
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((name for name in ("lo", "lo0") if name in names), "lo")


def holdings(model: CausalLM, kv_cache: PagedKVCache) -> dict[str, Any]:
    """What one rank holds: every parameter's shape, the KV cache's shape, its device and pid."""
    return {
        "rank": model.tp.rank,
        "pid": os.getpid(),
        "device": str(model.lm_head.weight.device),
        "weights": {name: list(p.shape) for name, p in model.named_parameters()},
        "kv_cache": list(kv_cache.layers[0].shape),  # one such tensor per layer
        "num_blocks": kv_cache.num_blocks,
    }


# -- the step's inputs, as one int64 tensor ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepHeader:
    """The sizes a rank needs to receive a step's inputs (one JSON line on its stdin)."""

    num_tokens: int  # T
    num_seqs: int  # S
    width: int  # W, the block tables' width

    @property
    def numel(self) -> int:
        # input_ids, positions, slot_mapping, token_seq_idx, token_offset; query_start_loc, seq_lens; block_tables
        return 5 * self.num_tokens + 2 * self.num_seqs + 1 + self.num_seqs * self.width


def pack(inputs: ForwardInputs) -> tuple[StepHeader, torch.Tensor]:
    """Rank 0: the step's inputs as one flat int64 tensor on its device, and their sizes."""
    m = inputs.metadata
    assert m.token_seq_idx is not None and m.token_offset is not None
    parts = [inputs.input_ids, inputs.positions, m.slot_mapping, m.token_seq_idx, m.token_offset]
    parts += [m.query_start_loc, m.seq_lens, m.block_tables.flatten()]
    header = StepHeader(inputs.input_ids.shape[0], m.num_seqs, m.block_tables.shape[1])
    return header, torch.cat([p.to(torch.int64) for p in parts])


def unpack(
    header: StepHeader, flat: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Rank r: input_ids, positions and the attention metadata back from the flat tensor."""
    t, s = header.num_tokens, header.num_seqs
    ids, positions, slots, seq_idx, offset, starts, lens, tables = flat.split([t] * 5 + [s + 1, s, s * header.width])
    starts_cpu, lens_cpu = starts.tolist(), lens.tolist()
    metadata = AttentionMetadata(
        query_start_loc=starts.to(torch.int32),
        seq_lens=lens.to(torch.int32),
        block_tables=tables.view(s, header.width).to(torch.int32),
        slot_mapping=slots,
        query_start_loc_cpu=starts_cpu,
        seq_lens_cpu=lens_cpu,
        block_size=block_size,
        token_seq_idx=seq_idx,
        token_offset=offset,
    )
    return ids, positions, metadata


# -- rank 0 ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class TensorParallelRanks:
    """Rank 0's handle on ranks 1..N-1: start them, send each step, check they live, stop them."""

    tp: TensorParallel  # rank 0's
    device: str  # rank 0's
    store: dist.Store
    processes: list[subprocess.Popen[bytes]]
    saved_threads: int  # rank 0's torch threads before the ranks took their share of the cores
    closed: bool = False
    num_steps: int = 0  # steps sent to the ranks
    _held: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def start(cls, config: EngineConfig, max_model_len: int, num_sharing: int = 1) -> TensorParallelRanks:
        """Start ranks 1..N-1 for ``config`` and join the process group with them as rank 0.

        The caller then loads rank 0's slice (``load_model(..., tp=ranks.tp)``) and builds its
        worker (``build_worker``), as each rank does meanwhile, and ends with ``attach``.
        """
        if dist.is_initialized():
            raise RuntimeError(
                "torch.distributed's default process group is already in use in this process "
                "(another engine with tensor_parallel_size > 1?); close that engine first"
            )
        from modkit.transport.addresses import run_dir  # here: an engine of one rank imports no zmq

        size = config.tensor_parallel_size
        device = rank_device(config.device, 0)
        path = run_dir() / f"tp-store-{uuid.uuid4().hex[:12]}"
        saved = torch.get_num_threads()
        threads = max(1, saved // size) if device == "cpu" else saved  # the ranks of one host share its cores
        spec = {
            "store": str(path),
            "size": size,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()},
            "max_model_len": max_model_len,
            "num_sharing": num_sharing,
            "threads": threads,
        }
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        processes = []
        try:
            for rank in range(1, size):
                proc = subprocess.Popen(
                    [sys.executable, "-m", "modkit.worker.tensor_parallel"], stdin=subprocess.PIPE, env=env
                )
                processes.append(proc)
                _send_line(proc, {**spec, "rank": rank})
            store = dist.FileStore(str(path), size)
            ranks = cls(TensorParallel(0, size), device, store, processes, saved)
            ranks._wait_joined()
            _join_group(store, 0, size, device)
            torch.set_num_threads(threads)
        except BaseException:
            for proc in processes:
                _stop(proc)
            raise
        return ranks

    def _wait_joined(self) -> None:
        """Wait until every rank is about to join the group, or fail at once if one exited."""
        for rank, proc in enumerate(self.processes, start=1):
            while True:
                try:
                    self.store.wait([f"joined/{rank}"], timedelta(seconds=JOIN_POLL_S))
                    break
                except (RuntimeError, dist.DistStoreError):  # not yet
                    if proc.poll() is not None:
                        message = f"tensor-parallel rank {rank} exited with code {proc.returncode} while starting"
                        raise RankDied(message) from None

    def attach(self, model: CausalLM, kv_cache: PagedKVCache) -> None:
        """Setup is done on every rank: read what each holds (they wrote it to the store)."""
        self._held = [holdings(model, kv_cache)]
        for rank in range(1, self.tp.size):
            self.store.wait([f"held/{rank}"], COLLECTIVE_TIMEOUT)
            self._held.append(json.loads(self.store.get(f"held/{rank}")))

    def held(self) -> list[dict[str, Any]]:
        """What each rank holds, rank 0 first: parameter shapes, KV cache shape, device, pid."""
        return list(self._held)

    @property
    def pids(self) -> list[int]:
        """The process ids of ranks 1..N-1."""
        return [proc.pid for proc in self.processes]

    def send_step(self, inputs: ForwardInputs) -> None:
        """Give ranks 1..N-1 this step's inputs; they run the same forward. RankDied if one is gone."""
        self.check_alive()
        header, flat = pack(inputs)
        for proc in self.processes:
            _send_line(proc, dataclasses.asdict(header))
        dist.broadcast(flat, src=0)
        self.num_steps += 1

    def check_alive(self, cause: BaseException | None = None, wait_s: float = 0.0) -> None:
        """RankDied if a rank has exited (waiting up to ``wait_s`` for one to be seen to exit)."""
        if self.closed:
            raise RankDied("the tensor-parallel ranks were stopped (close())")
        deadline = time.monotonic() + wait_s
        while True:
            for rank, proc in enumerate(self.processes, start=1):
                if proc.poll() is not None:
                    message = (
                        f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.returncode}; "
                        "this worker cannot compute any more steps"
                    )
                    raise RankDied(message) from cause
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def close(self) -> None:
        """Stop ranks 1..N-1 (their stdin closes: they exit) and leave the process group."""
        if self.closed:
            return
        self.closed = True
        for proc in self.processes:
            _stop(proc)
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self.saved_threads)


def _send_line(proc: subprocess.Popen[bytes], message: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(message).encode() + b"\n")
    proc.stdin.flush()


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """Close the rank's stdin (it exits), and kill it if it has not within ``timeout_s``."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):  # a rank that died leaves a broken pipe
            proc.stdin.close()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- ranks 1..N-1 -----------------------------------------------------------------------------------


def _lines_until_eof(stdin: IO[bytes], lines: list[bytes], ready: threading.Condition) -> None:
    """Read stdin on a thread; at its end (rank 0 closed it, or died) exit at once, whatever the main thread does."""
    for line in stdin:
        with ready:
            lines.append(line)
            ready.notify()
    os._exit(0)


def run_rank(stdin: IO[bytes]) -> None:
    """A rank's whole life: its spec, the group, its slice and KV cache, then one forward per step."""
    spec = json.loads(stdin.readline())
    rank, size = int(spec["rank"]), int(spec["size"])
    lines: list[bytes] = []
    ready = threading.Condition()
    threading.Thread(target=_lines_until_eof, args=(stdin, lines, ready), daemon=True).start()
    torch.set_num_threads(int(spec["threads"]))
    config = EngineConfig(**spec["config"])
    device = rank_device(config.device, rank)
    store = dist.FileStore(spec["store"], size)
    store.set(f"joined/{rank}", "1")
    _join_group(store, rank, size, device)
    tp = TensorParallel(rank, size)
    model = load_model(
        config.model, dtype=config.dtype, device=device, attention_backend=config.attention_backend, tp=tp
    )
    from modkit.worker.executor import build_worker  # executor imports this module

    worker, _ = build_worker(model, config, int(spec["max_model_len"]), num_sharing=int(spec["num_sharing"]))
    kv_cache = worker.runner.kv_cache
    store.set(f"held/{rank}", json.dumps(holdings(model, kv_cache)))
    while True:
        with ready:
            ready.wait_for(lambda: bool(lines))
            line = lines.pop(0)
        header = StepHeader(**json.loads(line))
        flat = torch.empty(header.numel, dtype=torch.int64, device=device)
        dist.broadcast(flat, src=0)
        input_ids, positions, metadata = unpack(header, flat, kv_cache.block_size)
        with torch.inference_mode():
            model.model(input_ids, positions, kv_cache.layers, metadata)  # the hidden states stay here


if __name__ == "__main__":
    run_rank(sys.stdin.buffer)
