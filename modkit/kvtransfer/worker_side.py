"""The worker side of the KV connector: blocks kept on a prefill worker, read by a decode worker.

::

    prefill worker (its step computed a prompt's last token)
        wait_for_save: copy the request's blocks out of its KV cache, keep them by req_id
    decode worker (its plan admits the request, reqs_to_load names its blocks)
        start_load_kv: RPC kv_blocks(req_id, first, n) to the prefill worker --> the blocks,
                       copied into those its KV cache manager allocated, then the forward
        a read that fails (the prefill worker is gone, a timeout, the blocks are not there) is
        tried once more; then the decode worker computes those tokens itself (recomputed)

Three connectors, all asking over the prefill worker's RPC socket (ZeroMQ, signed like every
call of the launch; ``ipc://`` in the launch's directory or CURVE on ``tcp://``), differing in
what the answer carries:

- ``ZmqKVConnector`` ("zmq", any device, any host): the prefill worker keeps the blocks on the
  host and the reply carries them as bytes, K/V as they lie in the cache with their dtype and
  shape beside them: no pickle. On a GPU that is two copies through host memory.
- ``ShmKVConnector`` ("shm", the CPU, one host): the prefill worker keeps the blocks in a
  file of its private directory and the reply carries its path; the decode worker maps the
  file and copies from it (shared memory: no bytes through the socket).
- ``CudaIpcKVConnector`` ("cuda_ipc", GPUs of one host): the blocks stay on the prefill
  worker's GPU and the reply carries a CUDA IPC handle to them (a few hundred bytes); the
  decode worker maps that memory and copies the blocks device to device (on one GPU, or
  between two over NVLink/PCIe).

The last two lend the blocks (``LendingKVConnector``): the decode worker tells the prefill
worker when it has copied them (``kv_release``), and only then are they freed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from modkit.kvtransfer.metadata import KVConnectorMetadata, LoadSpec
from modkit.registry import Registry
from modkit.swap import resolve, spec_for
from modkit.trace.events import TransferEvent
from modkit.transport import RpcClient
from modkit.transport.rundirs import shared_memory_parent, write_owner

if TYPE_CHECKING:
    from modkit.config import PipelineConfig

KEEP_S = 120.0  # a prefill worker forgets blocks nobody read for this long (the request ended elsewhere)
NUM_TRIES = 2


class TransferFailed(RuntimeError):
    """A decode worker could not read a request's blocks."""


@dataclass(slots=True)
class _Kept:
    blocks: torch.Tensor  # (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim), where keep() put it
    kept_at: float = field(default_factory=time.monotonic)
    path: Path | None = None  # the file that holds them ("shm"), removed when they are forgotten


class KVConnector:
    """The worker side of a connector (vLLM's ``KVConnectorBase_V1`` worker calls).

    Three calls make the contract, each made by the worker around a step's forward:

    - ``wait_for_save(meta)`` (prefill side, after the forward): the blocks of each request in
      ``meta.reqs_to_save`` hold its prompt; keep (or send) them for the decode worker;
    - ``start_load_kv(meta, block_tables, recompute)`` (decode side, before the forward): fill
      the blocks of each request in ``meta.reqs_to_load``, allocated by the decode side's KV
      cache manager; a load that fails must call ``recompute`` for those tokens, never skip them;
    - ``get_finished()``: the transfers done since the last call, as ``TransferEvent`` s.

    This base class keeps blocks on the host and writes them in; an implementation says how
    they travel by overriding ``read`` and ``kv_blocks`` (the question and the prefill side's
    answer), and where they wait and how a reply becomes a tensor (``keep``, ``forget``,
    ``blocks_from``, ``done_reading``). It is built as ``cls(worker_id, layers, timeout_s,
    rpc_address)``: ``layers`` is the worker's KV cache, one ``(2, num_blocks, block_size,
    num_kv_heads, head_dim)`` tensor per layer; ``rpc_address(i)`` is worker ``i``'s RPC socket.
    """

    def __init__(
        self, worker_id: int, layers: list[torch.Tensor], timeout_s: float, rpc_address: Callable[[int], str]
    ) -> None:
        self.worker_id, self.layers, self.timeout_s = worker_id, layers, timeout_s
        self.rpc_address = rpc_address
        self.kept: dict[str, _Kept] = {}
        self.finished: list[TransferEvent] = []  # since the last get_finished

    # -- prefill side ------------------------------------------------------------------------

    def wait_for_save(self, meta: KVConnectorMetadata | None) -> None:
        """Keep a copy of the blocks of each prompt this step computed, for the decode worker to read."""
        _expire(self.kept, self.forget)
        if not meta:
            return
        for req_id, block_ids in meta.reqs_to_save.items():
            index = torch.tensor(block_ids, dtype=torch.int64, device=self.layers[0].device)
            blocks = torch.stack([layer.index_select(1, index) for layer in self.layers])
            self.kept[req_id] = self.keep(blocks)

    def keep(self, blocks: torch.Tensor) -> _Kept:
        """Where a request's blocks wait for the decode worker: here, in host memory."""
        return _Kept(blocks.to("cpu"))

    def forget(self, kept: _Kept) -> None:
        """Let go of kept blocks: here nothing to do, the tensor goes with its last reference."""

    def kv_blocks(self, req_id: str, first_block: int, num_blocks: int) -> dict[str, Any]:
        """Blocks ``first_block`` ... of a kept request, as raw bytes; each is read once."""
        kept = self.kept.pop(req_id, None)
        if kept is None:
            return {"found": False}
        blocks = kept.blocks[:, :, first_block : first_block + num_blocks].contiguous()
        dtype = str(blocks.dtype).removeprefix("torch.")
        return {"found": True, "dtype": dtype, "shape": list(blocks.shape), "data": _as_bytes(blocks)}

    # -- decode side -------------------------------------------------------------------------

    def start_load_kv(
        self,
        meta: KVConnectorMetadata | None,
        block_tables: dict[str, list[int]],
        recompute: Callable[[str, int, int], None],
    ) -> None:
        """Fill each loading request's blocks before the forward: read them, or compute them here."""
        if not meta:
            return
        for req_id, spec in meta.reqs_to_load.items():
            dst = block_tables[req_id][spec.first_block : spec.first_block + spec.num_blocks]
            started, error = time.time(), None
            try:
                num_bytes = self._load(req_id, spec, dst)
            except TransferFailed as failure:
                error, num_bytes = str(failure), 0
                block_size = self.layers[0].shape[2]
                recompute(req_id, spec.first_block * block_size, spec.num_blocks * block_size)
            self.finished.append(
                TransferEvent(
                    req_id=req_id,
                    src_worker_id=spec.src_worker_id,
                    dst_worker_id=self.worker_id,
                    first_block=spec.first_block,
                    num_blocks=spec.num_blocks,
                    num_bytes=num_bytes,
                    started=started,
                    ended=time.time(),
                    failed=error,
                )
            )

    def get_finished(self) -> list[TransferEvent]:
        """The transfers (loads) finished since the last call."""
        done, self.finished = self.finished, []
        return done

    def _load(self, req_id: str, spec: LoadSpec, dst: list[int]) -> int:
        """Read the blocks (tried ``NUM_TRIES`` times), copy them into ``dst``; their size in bytes."""
        reply: dict[str, Any] = {}
        last_error = "no try"
        for _ in range(NUM_TRIES):
            try:
                reply = self.read(req_id, spec)
            except Exception as error:  # a timeout, a worker gone
                last_error = f"{type(error).__name__}: {error}"
                continue
            if not reply.get("found"):
                raise TransferFailed(f"worker-{spec.src_worker_id} does not hold {req_id}'s blocks")
            break
        else:
            raise TransferFailed(last_error)
        try:
            blocks = self.blocks_from(reply)
        except Exception as error:  # a handle that cannot be opened: computed here instead
            raise TransferFailed(f"{type(error).__name__}: {error}") from error
        num_bytes = blocks.numel() * blocks.element_size()
        self._write(blocks, dst)
        del blocks  # a mapped source is unmapped here, before its owner is told it may free it
        self.done_reading(req_id, spec)
        return num_bytes

    def _write(self, blocks: torch.Tensor, dst: list[int]) -> None:
        """Copy ``blocks`` (one entry per layer) into this worker's blocks ``dst``, and wait for it."""
        index = torch.tensor(dst, dtype=torch.int64, device=self.layers[0].device)
        for layer, kv in zip(self.layers, blocks.to(self.layers[0].device), strict=True):
            layer.index_copy_(1, index, kv)  # (2, n, block_size, heads, head_dim) into its blocks
        if index.is_cuda:  # the copies are done before the source is given back (and the time is theirs)
            torch.cuda.synchronize(index.device)

    def read(self, req_id: str, spec: LoadSpec) -> dict[str, Any]:
        """Ask the prefill worker for the blocks (how they travel is the implementation's)."""
        raise NotImplementedError

    def blocks_from(self, reply: dict[str, Any]) -> torch.Tensor:
        """The blocks a ``kv_blocks`` reply carries: here, as bytes."""
        dtype = getattr(torch, reply["dtype"])
        return torch.frombuffer(bytearray(reply["data"]), dtype=dtype).view(reply["shape"])

    def done_reading(self, req_id: str, spec: LoadSpec) -> None:
        """The blocks are copied in: here nothing more (the prefill worker forgot them when it replied)."""

    def kv_release(self, req_id: str) -> None:
        """Prefill side, over RPC: the decode worker has copied ``req_id``'s blocks (see ``done_reading``)."""

    def stats(self) -> dict[str, int]:
        """Requests whose blocks this (prefill) worker holds for a decode worker to read."""
        return {"num_requests_kept": len(self.kept)}

    def close(self) -> None:
        """Release what the connector holds (sockets, buffers); the worker is stopping."""
        for kept in self.kept.values():
            self.forget(kept)
        self.kept.clear()


KV_CONNECTORS: Registry[KVConnector] = Registry("KV connector")


@KV_CONNECTORS.register("zmq")
class ZmqKVConnector(KVConnector):
    """Reads blocks over each prefill worker's RPC socket (``WorkerService.kv_blocks``)."""

    def __init__(
        self, worker_id: int, layers: list[torch.Tensor], timeout_s: float, rpc_address: Callable[[int], str]
    ) -> None:
        super().__init__(worker_id, layers, timeout_s, rpc_address)
        self.clients: dict[int, RpcClient] = {}

    def read(self, req_id: str, spec: LoadSpec) -> dict[str, Any]:
        client = self.clients.get(spec.src_worker_id)
        if client is None:
            client = self.clients[spec.src_worker_id] = RpcClient(self.rpc_address(spec.src_worker_id), self.timeout_s)
        try:
            reply: dict[str, Any] = client.call("kv_blocks", req_id, spec.first_block, spec.num_blocks)
        except Exception:
            client.close()  # a REQ-like socket after a timeout is not reused
            del self.clients[spec.src_worker_id]
            raise
        return reply

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.clients.clear()
        super().close()


class LendingKVConnector(ZmqKVConnector):
    """A reply that carries a handle to the blocks, not the blocks: the decode worker maps them.

    The question still goes over the prefill worker's RPC socket. The prefill worker answers
    with where its kept copy lies (``handle``) and which part of it to read (shape, stride and
    offset: a prefix the decode worker caches is skipped without a copy), and lends it: the
    copy stays until the decode worker, having copied the blocks into its own, calls
    ``kv_release`` (or ``KEEP_S`` passes, if the decode worker died). Workers on one host
    only: a handle means nothing on another (``PipelineConfig`` refuses otherwise).
    """

    def __init__(
        self, worker_id: int, layers: list[torch.Tensor], timeout_s: float, rpc_address: Callable[[int], str]
    ) -> None:
        super().__init__(worker_id, layers, timeout_s, rpc_address)
        self.lent: dict[str, _Kept] = {}  # blocks a decode worker has a handle to, until it releases them

    # -- prefill side ------------------------------------------------------------------------

    def wait_for_save(self, meta: KVConnectorMetadata | None) -> None:
        _expire(self.lent, self.forget)
        super().wait_for_save(meta)

    def kv_blocks(self, req_id: str, first_block: int, num_blocks: int) -> dict[str, Any]:
        """Where blocks ``first_block`` ... of a kept request lie, lent until ``kv_release``."""
        kept = self.kept.pop(req_id, None)
        if kept is None:
            return {"found": False}
        kept.kept_at = time.monotonic()
        self.lent[req_id] = kept
        blocks = kept.blocks[:, :, first_block : first_block + num_blocks]
        return {
            "found": True,
            "dtype": str(blocks.dtype).removeprefix("torch."),
            "shape": list(blocks.shape),
            "stride": list(blocks.stride()),
            "storage_offset": blocks.storage_offset(),
            **self.handle(kept),
        }

    def handle(self, kept: _Kept) -> dict[str, Any]:
        """What another process of this host needs to map ``kept.blocks`` (ints, strings, bytes)."""
        raise NotImplementedError

    def kv_release(self, req_id: str) -> None:
        lent = self.lent.pop(req_id, None)
        if lent is not None:
            self.forget(lent)

    def stats(self) -> dict[str, int]:
        return super().stats() | {"num_requests_lent": len(self.lent)}

    def close(self) -> None:
        for lent in self.lent.values():
            self.forget(lent)
        self.lent.clear()
        super().close()

    # -- decode side -------------------------------------------------------------------------

    def done_reading(self, req_id: str, spec: LoadSpec) -> None:
        """Tell the prefill worker it may free the blocks, without waiting for its answer (the
        forward need not wait for it); if the message is lost, KEEP_S frees them."""
        try:
            self.clients[spec.src_worker_id].notify("kv_release", req_id)
        except Exception:  # the blocks are in; a lost release only costs the prefill worker memory a while
            client = self.clients.pop(spec.src_worker_id, None)
            if client is not None:
                client.close()


@KV_CONNECTORS.register("shm")
class ShmKVConnector(LendingKVConnector):
    """Blocks kept in a file that both workers map (shared memory), read without a socket's copy.

    The prefill worker keeps each request's blocks in a file of its own private directory
    (``modkit-kv-<random>`` in ``/dev/shm``, else the temporary directory; mode 0700); the
    reply carries the file's path, and the decode worker maps the file (``torch.from_file``)
    and copies from it.
    The file goes when the blocks are released or forgotten, the directory when the worker
    stops (or, if it was killed, at the next launch's sweep of dead launches' directories,
    ``modkit.transport.rundirs``). Workers on the CPU (``PipelineConfig`` refuses CUDA ones:
    docs/disaggregation.md says why).
    """

    def __init__(
        self, worker_id: int, layers: list[torch.Tensor], timeout_s: float, rpc_address: Callable[[int], str]
    ) -> None:
        super().__init__(worker_id, layers, timeout_s, rpc_address)
        self.directory: Path | None = None  # made at the first prompt kept

    def keep(self, blocks: torch.Tensor) -> _Kept:
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="modkit-kv-", dir=shared_memory_parent()))
            write_owner(self.directory)  # this worker: if it is killed, a later launch removes the directory
        path = self.directory / f"{uuid.uuid4().hex}.kv"
        mapped = torch.from_file(str(path), shared=True, size=blocks.numel(), dtype=blocks.dtype)
        mapped = mapped.view(blocks.shape).copy_(blocks)
        return _Kept(mapped, path=path)

    def forget(self, kept: _Kept) -> None:
        if kept.path is not None:
            kept.path.unlink(missing_ok=True)

    def handle(self, kept: _Kept) -> dict[str, Any]:
        return {"path": str(kept.path), "numel": kept.blocks.numel()}

    def blocks_from(self, reply: dict[str, Any]) -> torch.Tensor:
        """Map the prefill worker's file (read only: a private mapping) as the blocks it holds."""
        path = Path(reply["path"])
        if path.suffix != ".kv" or not path.parent.name.startswith("modkit-kv-"):
            raise TransferFailed(f"{path} is not a KV connector's file")
        dtype = getattr(torch, reply["dtype"])
        whole = torch.from_file(str(path), shared=False, size=reply["numel"], dtype=dtype)
        return whole.as_strided(reply["shape"], reply["stride"], reply["storage_offset"])

    def close(self) -> None:
        super().close()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


@KV_CONNECTORS.register("cuda_ipc")
class CudaIpcKVConnector(LendingKVConnector):
    """Blocks that stay on the prefill worker's GPU, mapped by the decode worker (CUDA IPC).

    The handle and its reference counter are torch's (``torch.multiprocessing``'s CUDA sharing,
    sent as bytes and ints instead of pickled): the memory is not reused while a process has it
    mapped. The decode worker copies device to device (on one GPU, or between two over NVLink
    or PCIe). Every worker on CUDA (``PipelineConfig`` refuses otherwise).
    """

    def keep(self, blocks: torch.Tensor) -> _Kept:
        """On the GPU: ``blocks`` is already a copy (``index_select``), the cache's blocks are free to reuse."""
        return _Kept(blocks)

    def handle(self, kept: _Kept) -> dict[str, Any]:
        # (device, memory handle, size, offset in the allocation, ref counter handle, its offset,
        # event handle, whether to wait on the event): ints and bytes
        return {"cuda_ipc": list(kept.blocks.untyped_storage()._share_cuda_())}

    def blocks_from(self, reply: dict[str, Any]) -> torch.Tensor:
        """Map the prefill worker's memory (waiting on its event: the blocks are written) as a tensor."""
        storage = torch.UntypedStorage._new_shared_cuda(*reply["cuda_ipc"])
        dtype = getattr(torch, reply["dtype"])
        blocks = torch.empty(0, dtype=dtype, device=storage.device)
        return blocks.set_(storage, reply["storage_offset"], reply["shape"], reply["stride"])


def _expire(held: dict[str, _Kept], forget: Callable[[_Kept], None]) -> None:
    """Forget the blocks held longer than ``KEEP_S`` (nobody read or released them: the request ended)."""
    now = time.monotonic()
    for req_id in [r for r, kept in held.items() if now - kept.kept_at > KEEP_S]:
        forget(held.pop(req_id))


def _as_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's memory as bytes (bfloat16 has no numpy dtype: viewed as bytes first)."""
    return tensor.view(torch.uint8).numpy().tobytes()


def make_connector(
    config: PipelineConfig, worker_id: int, layers: list[torch.Tensor], rpc_address: Callable[[int], str]
) -> KVConnector | None:
    """The worker side of ``config.kv_connector`` for a worker with a role; None for an aggregated one.

    The name is looked up as every swappable part's is (``modkit.swap.resolve``): a name in
    ``KV_CONNECTORS``, or ``"package.module:Class"`` imported in the worker's process.
    """
    if config.worker_role(worker_id) == "both":
        return None
    cls = resolve(spec_for(config.kv_connector, None), KV_CONNECTORS.get, None)
    connector: KVConnector = cls(worker_id, layers, config.kv_transfer_timeout_s, rpc_address)
    return connector
