"""CUDA graphs: one replay instead of a few hundred kernel launches.

``DecodeGraphs``: a whole step of decodes in one graph per batch size. ``PiecewiseGraphs``
(further down): steps with prompt chunks, the decoder stack in pieces cut at attention.

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
import itertools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from modkit.attention import AttentionBackend, AttentionMetadata

if TYPE_CHECKING:  # model_runner imports this module
    from modkit.worker.model_runner import DeviceTokens, ForwardInputs, ModelRunner, SequenceChunk


def capture_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's ladder of batch sizes: 1, 2, 4, then every 8 up to 256, every 32 after; the top covers max_num_seqs."""
    ladder = [1, 2, 4, *range(8, 257, 8), *range(288, 1025, 32)]
    sizes = [b for b in ladder if b < max_num_seqs]
    top = next((b for b in ladder if b >= max_num_seqs), max_num_seqs)
    return [*sizes, top]


class DecodeInputs:
    """The host side of a decode graph's inputs: one buffer per input, rows 0..b-1 filled each step.

    Rows 0..n-1 are the step's requests, rows n..b-1 padding up to the graph's size b. The
    buffers are pinned on a GPU host, so their copies to the device are asynchronous.
    """

    def __init__(self, runner: ModelRunner, rows: int, width: int, pin_memory: bool = False) -> None:
        self.runner = runner

        def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=pin_memory)

        self.token_ids = zeros(rows, dtype=torch.int64)
        self.positions = zeros(rows, dtype=torch.int64)
        self.slot_mapping = zeros(rows, dtype=torch.int64)
        self.seq_lens = zeros(rows, dtype=torch.int32)
        self.block_tables = zeros(rows, width, dtype=torch.int32)  # width: a request at max_model_len

    def fill(self, chunks: Sequence[SequenceChunk], b: int) -> None:
        """Write a decode step's rows (one new token per chunk), padded to ``b`` rows.

        A column at a time: one numpy operation per buffer, not one per request (at a batch
        of hundreds, a loop over the chunks would cost more than the rest of the step's host
        work). ``ModelRunner.validate``'s checks are made on the columns too; on a failure
        that loop runs, to name the chunk and the reason.
        """
        n = len(chunks)
        block_size = self.runner.kv_cache.block_size
        positions = np.fromiter((c.num_computed_tokens for c in chunks), np.int64, n)  # (n,)
        lengths = np.fromiter((len(c.block_table) for c in chunks), np.int64, n)  # (n,) block-table lengths
        tables = self.block_tables.numpy()  # (rows, width)
        if not self._fits(positions, lengths, tables.shape[1]):
            self.runner.validate(list(chunks))
            raise ValueError("a decode step the cache or the model cannot hold")
        # The ragged block tables, flattened, land at (row, column) pairs; cells past a row's
        # length keep earlier steps' ids, which nothing reads.
        flat = np.fromiter(itertools.chain.from_iterable(c.block_table for c in chunks), np.int32, int(lengths.sum()))
        rows = np.repeat(np.arange(n), lengths)  # (sum of lengths,)
        columns = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        tables[rows, columns] = flat
        tables[n:b, 0] = 0  # padding reads the null block
        if flat.min() < 0 or flat.max() >= self.runner.kv_cache.num_blocks:
            self.runner.validate(list(chunks))
            raise ValueError("a decode step names a block outside the cache")
        slots = tables[np.arange(n), positions // block_size] * block_size + positions % block_size  # (n,)
        token_ids = np.fromiter((c.token_ids[0] for c in chunks), np.int64, n)  # (n,)
        for host, values, pad in (
            (self.token_ids, token_ids, 0),
            (self.positions, positions, 0),
            (self.slot_mapping, slots, 0),  # padding writes to the null block
            (self.seq_lens, positions + 1, 1),  # padding: a context of one token
        ):
            column = host.numpy()
            column[:n] = values
            column[n:b] = pad

    def _fits(self, positions: np.ndarray, lengths: np.ndarray, width: int) -> bool:
        """Every position is within the model's length and its request's block table, every table
        within the buffer's width."""
        max_len = self.runner.model.config.max_position_embeddings
        covered = positions // self.runner.kv_cache.block_size < lengths
        return bool(positions.min() >= 0 and positions.max() < max_len and covered.all() and lengths.max() <= width)


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

        self.host = DecodeInputs(runner, rows, width, pin_memory=True)  # filled on the host, copied each step
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
    def run(self, chunks: Sequence[SequenceChunk], device_tokens: DeviceTokens | None = None) -> torch.Tensor:
        """Logits (len(chunks), vocab_size) float32 for a decode-only step, by replay."""
        b = self.sizes[bisect.bisect_left(self.sizes, len(chunks))]
        self.copied.synchronize()  # never overwrite pinned rows a copy still reads
        host = self.host
        host.fill(chunks, b)
        for pinned, device in (
            (host.token_ids, self.input_ids),
            (host.positions, self.positions),
            (host.slot_mapping, self.slot_mapping),
            (host.seq_lens, self.seq_lens),
            (host.block_tables, self.block_tables),
        ):
            device[:b].copy_(pinned[:b], non_blocking=True)
        self.copied.record()
        if device_tokens is not None:
            device_tokens.write(self.input_ids)
        self.graphs[b].replay()
        self.num_replays += 1
        return self.runner.model.lm_head(self.hidden[b][: len(chunks)]).float()


# -- piecewise graphs for steps with prompt chunks ---------------------------------------------


def piecewise_capture_sizes(max_num_batched_tokens: int) -> list[int]:
    """Token counts the piecewise graphs are captured at: 64, 128, 256, ... doubling; the top covers the budget."""
    sizes, t = [], 64
    while t < max_num_batched_tokens:
        sizes.append(t)
        t *= 2
    return [*sizes, max_num_batched_tokens]


class _SplitAtAttention(AttentionBackend):
    """Stands in for the attention backend while the stack is captured: each call ends the graph
    of the piece before it and begins the next one, and keeps what the real backend will need."""

    name = "split_at_attention"
    supports_cuda_graphs = True

    def __init__(self, graphs: PiecewiseGraphs, num_tokens: int, pool: Any) -> None:
        self.graphs, self.num_tokens, self.pool = graphs, num_tokens, pool
        self.pieces: list[torch.cuda.CUDAGraph] = []
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]] = []
        self.capturing = False

    def begin_piece(self) -> None:
        if self.capturing:
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=self.pool)
            self.pieces.append(graph)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if self.capturing:
            self.pieces[-1].capture_end()
            self.calls.append((query, key, value, kv_cache, scale))
        self.begin_piece()
        return self.graphs.attention_out[: self.num_tokens]


class PiecewiseGraphs:
    """Steps with prompt chunks: the decoder stack in graphs, cut at each attention call.

    Attention is the one part of a layer whose launch depends on the step's sequences (their
    number, their query lengths); everything else only on the number of tokens. So for each
    size T of a ladder (``piecewise_capture_sizes``) the stack is captured as num_layers + 1
    graphs, the pieces between attention calls (vLLM's piecewise CUDA graphs)::

        replay piece 0      embeddings, rotary tables, layer 0 up to q, k, v
        attention 0         eager, the real backend over the real T' <= T tokens
        replay piece 1      layer 0 from o_proj on, layer 1 up to q, k, v
        ...
        replay piece L      the last layer from o_proj on, the final norm

    The step's token ids and positions go into persistent buffers (rows past T' hold token 0
    at position 0); attention reads and writes only the real rows, and writes its output into
    one persistent buffer that the next piece reads. The rows past T' compute garbage that no
    row reads: everything but attention works row by row.
    """

    def __init__(self, runner: ModelRunner, max_num_batched_tokens: int) -> None:
        if runner.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {runner.device}")
        self.runner = runner
        self.sizes = piecewise_capture_sizes(max_num_batched_tokens)
        top, dev, config = self.sizes[-1], runner.device, runner.model.config
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(top, dtype=torch.int64, device=dev)
        dtype = runner.model.lm_head.weight.dtype
        self.attention_out = torch.zeros(top, config.num_attention_heads, config.head_dim, dtype=dtype, device=dev)
        self.pieces: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.calls: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]]] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # each size's output, (T, hidden_size)
        self.capture_s = 0.0
        self.pool_bytes = 0
        self.num_replays = 0

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, into one memory pool of their own."""
        # Imported here: model_runner imports this module, and so does the worker package that swaps is in.
        from modkit.worker.model_runner import SequenceChunk
        from modkit.worker.swaps import set_attention_backend

        start = time.perf_counter()
        device = self.runner.device
        before = torch.cuda.memory_reserved(device)
        pool = torch.cuda.graph_pool_handle()
        model, backend = self.runner.model, self.runner.model.attention_backend
        # Any metadata will do: only attention reads it, and attention is not captured.
        metadata = self.runner.prepare([SequenceChunk([0], 0, [0])]).metadata
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                for t in reversed(self.sizes):
                    splitter = _SplitAtAttention(self, t, pool)
                    set_attention_backend(model, splitter)
                    layers = self.runner.kv_cache.layers
                    model.model(self.input_ids[:t], self.positions[:t], layers, metadata)  # warm-up
                    splitter.capturing = True
                    splitter.begin_piece()
                    self.hidden[t] = model.model(self.input_ids[:t], self.positions[:t], layers, metadata)
                    splitter.pieces[-1].capture_end()
                    self.pieces[t], self.calls[t] = splitter.pieces, splitter.calls
        finally:
            set_attention_backend(model, backend)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize(device)
        self.capture_s = time.perf_counter() - start
        self.pool_bytes = torch.cuda.memory_reserved(device) - before

    def can_run(self, inputs: ForwardInputs) -> bool:
        return inputs.input_ids.shape[0] <= self.max_tokens

    @torch.inference_mode()
    def run(self, inputs: ForwardInputs) -> torch.Tensor:
        """Logits (len(logits_indices), vocab_size) float32 for prepared inputs, by replay."""
        n = inputs.input_ids.shape[0]
        t = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(inputs.input_ids)
        self.input_ids[n:t].zero_()
        self.positions[:n].copy_(inputs.positions)
        self.positions[n:t].zero_()
        backend = self.runner.model.attention_backend
        pieces = self.pieces[t]
        # One piece more than attention calls: the last piece runs after the last layer's attention.
        for piece, (query, key, value, kv_cache, scale) in zip(pieces, self.calls[t], strict=False):
            piece.replay()
            out = backend.forward(query[:n], key[:n], value[:n], kv_cache, inputs.metadata, scale)
            self.attention_out[:n].copy_(out)
        pieces[-1].replay()
        self.num_replays += 1
        return self.runner.model.lm_head(self.hidden[t][inputs.logits_indices]).float()
