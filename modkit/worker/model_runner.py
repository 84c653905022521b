"""Turn one step's work into one flat forward pass over the paged KV cache.

The step's work is a list of ``SequenceChunk``s, one per request: the tokens to compute
now, how many of the request's tokens are already in the cache, and the request's block
table. A chunk may be a whole prompt, a piece of a prompt (chunked prefill), or the one
token a decoding request just sampled; any mix goes into the same forward.
"""

from __future__ import annotations

import gc
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from modkit.attention import AttentionMetadata
from modkit.model.decoder import CausalLM
from modkit.transfer import to_device
from modkit.worker.cuda_graphs import DecodeGraphs, PiecewiseGraphs
from modkit.worker.kv_cache import PagedKVCache

if TYPE_CHECKING:
    from modkit.worker.tensor_parallel import TensorParallelRanks


@dataclass(slots=True)
class SequenceChunk:
    """What one request computes in one forward pass."""

    token_ids: list[int]  # the new tokens: a prompt chunk, or one sampled token
    num_computed_tokens: int  # tokens of this request already in the KV cache
    block_table: list[int]  # block ids covering at least num_computed_tokens + len(token_ids)
    # How many of the new tokens, counted from the last, need logits: 1 to sample the next
    # token, 0 for a prompt chunk that does not reach the end of the prompt, all of them
    # for prompt logprobs.
    num_logits: int = 1


@dataclass(slots=True)
class DeviceTokens:
    """Input tokens still on the device: sampled by the step before, whose ids are not on the host yet.

    Their rows of ``input_ids`` hold a placeholder on the host and are overwritten on the
    device, after the copy and before the forward, with no wait for the host.
    """

    positions: list[int] = field(default_factory=list)  # rows of the flat batch
    rows: list[int] = field(default_factory=list)  # for each, its row of ``source``
    source: torch.Tensor | None = None  # the sampled ids (N,) of the step that sampled them

    def add(self, position: int, source: torch.Tensor, row: int) -> None:
        # One step in flight at a time: a launched step reads the tokens of the step before only.
        assert self.source is None or source is self.source, "device tokens of two steps"
        self.positions.append(position)
        self.rows.append(row)
        self.source = source

    def write(self, input_ids: torch.Tensor) -> None:
        """Overwrite the placeholders of ``input_ids`` (on the model's device) with the sampled ids."""
        assert self.source is not None
        device = input_ids.device
        values = self.source.index_select(0, to_device(self.rows, torch.int64, device))
        input_ids.index_copy_(0, to_device(self.positions, torch.int64, device), values)


@dataclass(slots=True)
class ForwardInputs:
    """The tensors of one flat batch, on the model's device."""

    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # (N,) int64, rows of the batch whose logits are returned


class ModelRunner:
    """Runs a ``CausalLM`` over a ``PagedKVCache``; holds no per-request state.

    With ``capture_cuda_graphs``, decode-only steps replay a CUDA graph, and other steps of up
    to max_num_batched_tokens tokens replay the decoder stack in pieces with attention run
    eagerly between them (``cuda_graphs.py``); without, every step runs eagerly.
    """

    def __init__(self, model: CausalLM, kv_cache: PagedKVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = next(model.parameters()).device
        self.graphs: DecodeGraphs | None = None
        self.piecewise: PiecewiseGraphs | None = None
        # Rank 0 of a tensor-parallel worker: the other ranks, given each forward's inputs.
        self.tensor_parallel_ranks: TensorParallelRanks | None = None

    def capture_cuda_graphs(
        self, max_num_seqs: int, max_model_len: int, max_num_batched_tokens: int | None = None
    ) -> DecodeGraphs:
        """Capture the decode graphs now (seconds), and the piecewise ones for steps of up to
        ``max_num_batched_tokens`` tokens if given; needs a CUDA device and a graph-safe attention backend."""
        backend = self.model.attention_backend
        if not backend.supports_cuda_graphs:
            raise ValueError(f"attention backend {backend.name!r} cannot run inside a CUDA graph")
        # No garbage collection during a capture: freeing an earlier engine's CUDA or pinned
        # tensors there (say, an LLM deleted in a notebook) would break the capture. Garbage
        # of now is freed now.
        gc.collect()
        collecting = gc.isenabled()
        gc.disable()
        try:
            graphs = DecodeGraphs(self, max_num_seqs, max_model_len)
            graphs.capture()
            self.graphs = graphs
            if max_num_batched_tokens is not None:
                piecewise = PiecewiseGraphs(self, max_num_batched_tokens)
                piecewise.capture()
                self.piecewise = piecewise
        finally:
            if collecting:
                gc.enable()
        return graphs

    def drop_cuda_graphs(self) -> None:
        """Run every step eagerly from now on (the graphs replay the kernels of the backend they captured)."""
        self.graphs, self.piecewise = None, None

    @property
    def cuda_graph_pool_bytes(self) -> int:
        return sum(g.pool_bytes for g in (self.graphs, self.piecewise) if g is not None)

    @property
    def num_cuda_graph_replays(self) -> int:
        return sum(g.num_replays for g in (self.graphs, self.piecewise) if g is not None)

    def prepare(self, chunks: list[SequenceChunk]) -> ForwardInputs:
        """Lay the chunks end to end and describe where their tokens go in the cache.

        Python loops here run once per chunk; everything per token is a tensor operation,
        so preparing a step costs little next to the forward it feeds.
        """
        self.validate(chunks)
        block_size = self.kv_cache.block_size
        num_seqs = len(chunks)
        query_lens = torch.tensor([len(c.token_ids) for c in chunks])  # (S,)
        computed = torch.tensor([c.num_computed_tokens for c in chunks])  # (S,)
        num_logits = torch.tensor([c.num_logits for c in chunks])  # (S,)
        query_start_loc = torch.zeros(num_seqs + 1, dtype=torch.int64)
        torch.cumsum(query_lens, 0, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        width = max(len(c.block_table) for c in chunks)
        block_tables = torch.tensor([c.block_table + [0] * (width - len(c.block_table)) for c in chunks])  # (S, nb)

        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), query_lens)  # (T,)
        offset_in_chunk = torch.arange(num_tokens) - query_start_loc[seq_of_token]  # (T,)
        positions = computed[seq_of_token] + offset_in_chunk  # (T,)
        blocks = block_tables[seq_of_token, positions // block_size]  # (T,)
        slot_mapping = blocks * block_size + positions % block_size  # (T,)
        # Logit rows: the last num_logits tokens of each chunk.
        seq_of_logit = torch.repeat_interleave(torch.arange(num_seqs), num_logits)  # (N,)
        logit_starts = torch.cumsum(num_logits, 0) - num_logits  # (S,)
        offset_in_tail = torch.arange(int(num_logits.sum())) - logit_starts[seq_of_logit]  # (N,)
        logits_indices = query_start_loc[seq_of_logit + 1] - num_logits[seq_of_logit] + offset_in_tail

        seq_lens = computed + query_lens
        input_ids = torch.tensor(list(itertools.chain.from_iterable(c.token_ids for c in chunks)))
        dev = self.device
        metadata = AttentionMetadata(
            query_start_loc=to_device(query_start_loc, torch.int32, dev),
            seq_lens=to_device(seq_lens, torch.int32, dev),
            block_tables=to_device(block_tables, torch.int32, dev),
            slot_mapping=to_device(slot_mapping, torch.int64, dev),
            query_start_loc_cpu=query_start_loc.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
            block_size=block_size,
            token_seq_idx=to_device(seq_of_token, torch.int64, dev),
            token_offset=to_device(offset_in_chunk, torch.int64, dev),
        )
        return ForwardInputs(
            input_ids=to_device(input_ids, torch.int64, dev),
            positions=to_device(positions, torch.int64, dev),
            metadata=metadata,
            logits_indices=to_device(logits_indices, torch.int64, dev),
        )

    def validate(self, chunks: list[SequenceChunk]) -> None:
        """Refuse work the cache or the model cannot hold, naming the chunk and the reason."""
        if not chunks:
            raise ValueError("a forward pass needs at least one sequence chunk")
        block_size, num_blocks = self.kv_cache.block_size, self.kv_cache.num_blocks
        max_len = self.model.config.max_position_embeddings
        for i, chunk in enumerate(chunks):
            end = chunk.num_computed_tokens + len(chunk.token_ids)
            if not chunk.token_ids:
                raise ValueError(f"chunk {i} has no tokens")
            if chunk.num_computed_tokens < 0:
                raise ValueError(f"chunk {i} has negative num_computed_tokens")
            if end > max_len:
                raise ValueError(f"chunk {i} reaches position {end}, past the model's limit of {max_len}")
            if len(chunk.block_table) * block_size < end:
                raise ValueError(
                    f"chunk {i} needs {-(-end // block_size)} blocks for {end} tokens, "
                    f"its block table has {len(chunk.block_table)}"
                )
            if chunk.block_table and not 0 <= min(chunk.block_table) <= max(chunk.block_table) < num_blocks:
                raise ValueError(f"chunk {i} names a block outside 0..{num_blocks - 1}")
            if not 0 <= chunk.num_logits <= len(chunk.token_ids):
                raise ValueError(f"chunk {i} asks for {chunk.num_logits} logits of {len(chunk.token_ids)} tokens")

    @torch.inference_mode()
    def execute(self, chunks: list[SequenceChunk], device_tokens: DeviceTokens | None = None) -> torch.Tensor:
        """Run the chunks; return float32 logits (sum of num_logits, vocab_size) in chunk order.

        ``device_tokens``: rows of the batch whose token is taken on the device (see ``DeviceTokens``).
        """
        if self.graphs is not None and self.graphs.can_run(chunks):
            return self.graphs.run(chunks, device_tokens)  # validated there, a column at a time
        inputs = self.prepare(chunks)
        if device_tokens is not None:
            device_tokens.write(inputs.input_ids)
        if self.piecewise is not None and self.piecewise.can_run(inputs):
            return self.piecewise.run(inputs)
        return self.forward(inputs)

    @torch.inference_mode()
    def forward(self, inputs: ForwardInputs) -> torch.Tensor:
        """The eager forward of prepared inputs; with tensor parallelism, on every rank at once."""
        ranks = self.tensor_parallel_ranks
        try:
            if ranks is not None:
                ranks.send_step(inputs)  # ranks 1..N-1 run the same forward over their heads
            return self.model(
                inputs.input_ids, inputs.positions, self.kv_cache.layers, inputs.metadata, inputs.logits_indices
            )
        except (RuntimeError, OSError) as error:
            if ranks is not None:  # a pipe or a collective failed: RankDied if a rank is gone
                ranks.check_alive(error, wait_s=1.0)
            raise
