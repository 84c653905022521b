"""Turn one step's work into one flat forward pass over the paged KV cache.

The step's work is a list of ``SequenceChunk``s, one per request: the tokens to compute
now, how many of the request's tokens are already in the cache, and the request's block
table. A chunk may be a whole prompt, a piece of a prompt (chunked prefill), or the one
token a decoding request just sampled; any mix goes into the same forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modkit.attention import AttentionMetadata
from modkit.model.decoder import CausalLM
from modkit.worker.kv_cache import PagedKVCache


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
class ForwardInputs:
    """The tensors of one flat batch, on the model's device."""

    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # (N,) int64, rows of the batch whose logits are returned
    num_logits: list[int] = field(default_factory=list)  # per chunk, to split the logits


class ModelRunner:
    """Runs a ``CausalLM`` over a ``PagedKVCache``; holds no per-request state."""

    def __init__(self, model: CausalLM, kv_cache: PagedKVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = next(model.parameters()).device

    def prepare(self, chunks: list[SequenceChunk]) -> ForwardInputs:
        """Lay the chunks end to end and describe where their tokens go in the cache."""
        if not chunks:
            raise ValueError("a forward pass needs at least one sequence chunk")
        block_size = self.kv_cache.block_size
        max_len = self.model.config.max_position_embeddings
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        for i, chunk in enumerate(chunks):
            start, end = chunk.num_computed_tokens, chunk.num_computed_tokens + len(chunk.token_ids)
            if not chunk.token_ids:
                raise ValueError(f"chunk {i} has no tokens")
            if end > max_len:
                raise ValueError(f"chunk {i} reaches position {end}, past the model's limit of {max_len}")
            if len(chunk.block_table) * block_size < end:
                raise ValueError(
                    f"chunk {i} needs {-(-end // block_size)} blocks for {end} tokens, "
                    f"its block table has {len(chunk.block_table)}"
                )
            if any(not 0 <= b < self.kv_cache.num_blocks for b in chunk.block_table):
                raise ValueError(f"chunk {i} names a block outside 0..{self.kv_cache.num_blocks - 1}")
            if not 0 <= chunk.num_logits <= len(chunk.token_ids):
                raise ValueError(f"chunk {i} asks for {chunk.num_logits} logits of {len(chunk.token_ids)} tokens")
            input_ids.extend(chunk.token_ids)
            positions.extend(range(start, end))
            slots.extend(chunk.block_table[p // block_size] * block_size + p % block_size for p in range(start, end))
            row_end = query_start_loc[-1] + len(chunk.token_ids)
            logits_indices.extend(range(row_end - chunk.num_logits, row_end))
            query_start_loc.append(row_end)
            seq_lens.append(end)
        max_blocks = max(len(c.block_table) for c in chunks)
        block_tables = torch.zeros((len(chunks), max_blocks), dtype=torch.int32)
        for i, chunk in enumerate(chunks):
            block_tables[i, : len(chunk.block_table)] = torch.tensor(chunk.block_table, dtype=torch.int32)

        def on_device(values: list[int] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(values, dtype=dtype).to(self.device)

        metadata = AttentionMetadata(
            query_start_loc=on_device(query_start_loc, torch.int32),
            seq_lens=on_device(seq_lens, torch.int32),
            block_tables=on_device(block_tables, torch.int32),
            slot_mapping=on_device(slots, torch.int64),
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
            block_size=block_size,
        )
        return ForwardInputs(
            input_ids=on_device(input_ids, torch.int64),
            positions=on_device(positions, torch.int64),
            metadata=metadata,
            logits_indices=on_device(logits_indices, torch.int64),
            num_logits=[c.num_logits for c in chunks],
        )

    @torch.inference_mode()
    def execute(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        """Run the chunks; return float32 logits (sum of num_logits, vocab_size) in chunk order."""
        inputs = self.prepare(chunks)
        return self.model(
            inputs.input_ids, inputs.positions, self.kv_cache.layers, inputs.metadata, inputs.logits_indices
        )
