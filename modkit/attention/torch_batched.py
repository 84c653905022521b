"""Paged attention for all requests at once, in plain PyTorch: pad, mask, one SDPA call.

The reference backend loops over requests; with 64 requests and 4 layers that is 256
small kernel launches per step, and the launches, not the arithmetic, set the step time.
This backend pads instead::

    queries  (num_seqs, max_query_len, H, D)   request s's new tokens in row s, rest padding
    context  (num_seqs, max_seq_len, KVH, D)   gathered from each request's blocks
    mask     key i visible to query j of s  iff  i <= seq_len[s] - query_len[s] + j

and hands the lot to ``scaled_dot_product_attention``. Padding rows compute garbage that
is never read back. The leading run of decodes (one new token each; the worker puts
decodes first) is padded apart from the prompt chunks after it, so a step of many decodes
and one long prompt chunk does not pad every decode to the chunk's length. Prompt chunks
of very different lengths still pad to the longest, which a real varlen kernel (the
Triton backend to come) avoids.
"""

from __future__ import annotations

import itertools

import torch
from torch.nn import functional as F

from modkit.attention.interface import (
    AttentionBackend,
    AttentionMetadata,
    register_attention_backend,
    write_to_kv_cache,
)


@register_attention_backend("torch_batched")
class TorchBatchedAttention(AttentionBackend):
    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None  # reused by every layer, grown on demand

    def _workspace(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        buf = self._buffer
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffer = torch.empty(
                max(numel, 2 * (buf.numel() if buf is not None else 0)), dtype=like.dtype, device=like.device
            )
        return buf[:numel]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_to_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        # Decodes (one new token) and prompt chunks are padded separately: padded together,
        # every decode row would be padded to the longest prompt chunk.
        starts, num_seqs = metadata.query_start_loc_cpu, metadata.num_seqs
        num_decodes = next((s for s in range(num_seqs) if starts[s + 1] - starts[s] > 1), num_seqs)
        groups = [(0, num_decodes), (num_decodes, num_seqs)]
        parts = [self._attend(query, kv_cache, metadata, scale, a, b) for a, b in groups if a < b]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float, s0: int, s1: int
    ) -> torch.Tensor:
        """Attention for sequences s0..s1-1, whose new tokens are one contiguous run of the batch."""
        assert metadata.token_seq_idx is not None and metadata.token_offset is not None
        starts = metadata.query_start_loc_cpu
        t0, t1 = starts[s0], starts[s1]
        num_seqs = s1 - s0
        max_q = max(b - a for a, b in itertools.pairwise(starts[s0 : s1 + 1]))
        max_s = max(metadata.seq_lens_cpu[s0:s1])
        num_heads, head_dim = query.shape[1], query.shape[2]
        block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
        num_blocks = -(-max_s // block_size)
        # Gather each request's context, in token order, into a reused workspace.
        # NOTE: on CPU a fresh multi-megabyte tensor per layer costs more in page faults than
        # the copy itself, hence the workspace; and index_select over blocks viewed as flat
        # rows is cheaper than kv[tables] on the 4-D layout (docs/benchmarks.md has the figures).
        tables = metadata.block_tables[s0:s1, :num_blocks].reshape(-1)  # (S * nb,)
        row = block_size * num_kv_heads * head_dim
        k, v = self._workspace(2 * tables.numel() * row, kv_cache).view(2, tables.numel(), row)
        torch.index_select(kv_cache[0].view(-1, row), 0, tables, out=k)
        torch.index_select(kv_cache[1].view(-1, row), 0, tables, out=v)
        gathered = (num_seqs, num_blocks * block_size, num_kv_heads, head_dim)
        k = k.view(gathered)[:, :max_s]  # (S, max_s, KVH, D)
        v = v.view(gathered)[:, :max_s]
        rows, cols = metadata.token_seq_idx[t0:t1] - s0, metadata.token_offset[t0:t1]
        q = query.new_zeros(num_seqs, max_q, num_heads, head_dim)
        q[rows, cols] = query[t0:t1]  # (S, max_q, H, D)

        seq_lens = metadata.seq_lens[s0:s1].long()
        query_lens = (metadata.query_start_loc[s0 + 1 : s1 + 1] - metadata.query_start_loc[s0:s1]).long()
        q_pos = (seq_lens - query_lens)[:, None] + torch.arange(max_q, device=query.device)  # (S, max_q)
        k_pos = torch.arange(max_s, device=query.device)  # (max_s,)
        visible = k_pos[None, None, :] <= q_pos[:, :, None]  # (S, max_q, max_s)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # (S, H, max_q, D)
            k.transpose(1, 2),  # (S, KVH, max_s, D)
            v.transpose(1, 2),
            attn_mask=visible[:, None],
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )  # (S, H, max_q, D)
        return out.transpose(1, 2)[rows, cols]  # (t1 - t0, H, D)
