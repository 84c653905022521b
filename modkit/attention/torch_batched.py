"""Paged attention for all requests at once, in plain PyTorch: pad, mask, one SDPA call.

The reference backend loops over requests; with 64 requests and 4 layers that is 256
small kernel launches per step, and the launches, not the arithmetic, set the step time.
This backend pads instead::

    queries  (num_seqs, max_query_len, H, D)   request s's new tokens in row s, rest padding
    context  (num_seqs, max_seq_len, KVH, D)   gathered from each request's blocks
    mask     key i visible to query j of s  iff  i <= seq_len[s] - query_len[s] + j

and hands the lot to ``scaled_dot_product_attention``. Padding rows compute garbage that
is never read back. Cheap when the batch is mostly decodes (max_query_len 1) or prompts
of similar lengths; a batch of one long prompt and many decodes pads every decode up to
the prompt's length, which a real kernel (FlashAttention's varlen, the Triton backend to
come) avoids.
"""

from __future__ import annotations

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
        assert metadata.token_seq_idx is not None and metadata.token_offset is not None
        num_seqs, max_q, max_s = metadata.num_seqs, metadata.max_query_len, metadata.max_seq_len
        num_heads, head_dim = query.shape[1], query.shape[2]
        block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
        num_blocks = -(-max_s // block_size)
        # Gather each request's context, in token order, into a reused workspace.
        # NOTE: on CPU a fresh multi-megabyte tensor per layer costs more in page faults than
        # the copy itself, hence the workspace; and index_select over blocks viewed as flat
        # rows is several times faster than kv[tables] on the 4-D layout.
        tables = metadata.block_tables[:, :num_blocks].reshape(-1)  # (S * nb,)
        row = block_size * num_kv_heads * head_dim
        k, v = self._workspace(2 * tables.numel() * row, kv_cache).view(2, tables.numel(), row)
        torch.index_select(kv_cache[0].view(-1, row), 0, tables, out=k)
        torch.index_select(kv_cache[1].view(-1, row), 0, tables, out=v)
        gathered = (num_seqs, num_blocks * block_size, num_kv_heads, head_dim)
        k = k.view(gathered)[:, :max_s]  # (S, max_s, KVH, D)
        v = v.view(gathered)[:, :max_s]
        rows, cols = metadata.token_seq_idx, metadata.token_offset
        q = query.new_zeros(num_seqs, max_q, num_heads, head_dim)
        q[rows, cols] = query  # (S, max_q, H, D)

        seq_lens = metadata.seq_lens.long()
        query_lens = (metadata.query_start_loc[1:] - metadata.query_start_loc[:-1]).long()
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
        return out.transpose(1, 2)[rows, cols]  # (T, H, D)
