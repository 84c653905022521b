"""CUDA graphs for decode-only steps: one replay instead of a few hundred kernel launches.

A decode step of a small model is short on the GPU (about a millisecond for Qwen2.5-0.5B
at batch 256) but launches every kernel of every layer one by one from Python, so the GPU
waits for the host most of the step. A CUDA graph records those launches once and replays
them with one call. Replays read their inputs from fixed addresses, so each graph owns
*persistent input buffers*, and the step's inputs are copied into them before the replay::

    capture (once, at start), for each batch size b of a ladder 1, 2, 4, 8, 16, 24, ...:
        decoder stack over  input_ids[:b], positions[:b], slot_mapping[:b],
                            seq_lens[:b], block_tables[:b]              -> hidden[:b]
    each decode-only step of n requests:
        b = the smallest captured size >= n
        rows 0..n-1   <- the requests (filled on the host in pinned memory, one
                         non-blocking copy per buffer)
        rows n..b-1   <- padding: token 0 at position 0, written to slot 0 of the null
                         block (block 0, never allocated), context of one token
        replay graph b; logits = lm_head(hidden[:n])   (eager: one matmul)

What a graph can hold: the attention backend must launch a fixed sequence of kernels for a
given (num_seqs, max_query_len) and read lengths and block tables on the device only
(``AttentionBackend.supports_cuda_graphs``; the Triton backend does). Steps with a prompt
chunk, or more requests than the largest graph, run eagerly. The vocabulary projection
stays outside the graphs, so the graphs' memory pool does not keep a (b, vocab) logits
tensor per size.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from modkit.attention import AttentionMetadata

if TYPE_CHECKING:  # model_runner imports this module
    from modkit.worker.model_runner import ModelRunner, SequenceChunk


def capture_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's ladder of batch sizes: 1, 2, 4, then every 8 up to 256, every 32 after; the top covers max_num_seqs."""
    ladder = [1, 2, 4, *range(8, 257, 8), *range(288, 1025, 32)]
    sizes = [b for b in ladder if b < max_num_seqs]
    top = next((b for b in ladder if b >= max_num_seqs), max_num_seqs)
    return [*sizes, top]


class DecodeGraphs:
    """Persistent input buffers and one captured decoder stack per batch size."""

    def __init__(self, runner: ModelRunner, max_num_seqs: int, max_model_len: int) -> None:
        if runner.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {runner.device}")
        self.runner = runner
        self.sizes = capture_sizes(max_num_seqs)
        rows = self.sizes[-1]
        block_size = runner.kv_cache.block_size
        width = -(-max_model_len // block_size)  # block-table columns: a request at full length
        dev = runner.device

        def pinned(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=True)

        # Host side (pinned, so copies to the device can be asynchronous) and device side of each input.
        self.host_ids = pinned(rows, dtype=torch.int64)
        self.host_positions = pinned(rows, dtype=torch.int64)
        self.host_slots = pinned(rows, dtype=torch.int64)
        self.host_seq_lens = pinned(rows, dtype=torch.int32)
        self.host_tables = pinned(rows, width, dtype=torch.int32)
        self.input_ids = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(rows, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(rows, width, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=dev)  # one token each
        self.token_seq_idx = torch.arange(rows, dtype=torch.int64, device=dev)
        self.token_offset = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.copied = torch.cuda.Event()  # the last step's copies out of the pinned buffers are done
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # each graph's output, (b, hidden_size)
        self.capture_s = 0.0
        self.pool_bytes = 0
        self.num_replays = 0

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _metadata(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            slot_mapping=self.slot_mapping[:b],
            query_start_loc_cpu=list(range(b + 1)),
            # NOTE: placeholders. A graph-safe backend reads lengths on the device only; these
            # only tell it the batch's shape (b sequences of one new token).
            seq_lens_cpu=[1] * b,
            block_size=self.runner.kv_cache.block_size,
            token_seq_idx=self.token_seq_idx[:b],
            token_offset=self.token_offset[:b],
        )

    def _stack(self, b: int) -> torch.Tensor:
        decoder = self.runner.model.model
        return decoder(self.input_ids[:b], self.positions[:b], self.runner.kv_cache.layers, self._metadata(b))

    @torch.inference_mode()
    def capture(self) -> None:
        """Record the decoder stack at every size, largest first, into one shared memory pool."""
        start = time.perf_counter()
        before = torch.cuda.memory_reserved(self.runner.device)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):
                self._stack(b)  # warm-up: Triton compiles, cuBLAS picks its kernels
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.hidden[b] = self._stack(b)
                self.graphs[b] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize(self.runner.device)
        self.capture_s = time.perf_counter() - start
        self.pool_bytes = torch.cuda.memory_reserved(self.runner.device) - before

    def can_run(self, chunks: Sequence[SequenceChunk]) -> bool:
        """A decode-only step (one new token and one logit row each) that a graph is big enough for."""
        return len(chunks) <= self.max_batch and all(len(c.token_ids) == 1 == c.num_logits for c in chunks)

    @torch.inference_mode()
    def run(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        """Logits (len(chunks), vocab_size) float32 for a decode-only step, by replay."""
        n = len(chunks)
        b = self.sizes[bisect.bisect_left(self.sizes, n)]
        block_size = self.runner.kv_cache.block_size
        self.copied.synchronize()  # never overwrite pinned rows a copy still reads
        positions = [c.num_computed_tokens for c in chunks]
        tables = self.host_tables.numpy()
        slots = []
        for i, (chunk, pos) in enumerate(zip(chunks, positions, strict=True)):
            table = chunk.block_table
            tables[i, : len(table)] = table
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        pad = b - n
        self.host_ids[:b] = torch.tensor([c.token_ids[0] for c in chunks] + [0] * pad)
        self.host_positions[:b] = torch.tensor(positions + [0] * pad)
        self.host_slots[:b] = torch.tensor(slots + [0] * pad)  # padding writes to the null block
        self.host_seq_lens[:b] = torch.tensor([p + 1 for p in positions] + [1] * pad)
        tables[n:b, 0] = 0  # padding reads the null block
        for host, device in (
            (self.host_ids, self.input_ids),
            (self.host_positions, self.positions),
            (self.host_slots, self.slot_mapping),
            (self.host_seq_lens, self.seq_lens),
            (self.host_tables, self.block_tables),
        ):
            device[:b].copy_(host[:b], non_blocking=True)
        self.copied.record()
        self.graphs[b].replay()
        self.num_replays += 1
        return self.runner.model.lm_head(self.hidden[b][:n]).float()
