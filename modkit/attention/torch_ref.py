"""Reference paged attention in plain PyTorch: one request at a time, easy to read.

It runs on any device and is the oracle that faster backends are tested against.
Scores and softmax are computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

import torch

from modkit.attention.interface import (
    AttentionBackend,
    AttentionMetadata,
    register_attention_backend,
    write_to_kv_cache,
)


@register_attention_backend("torch_ref")
class TorchReferenceAttention(AttentionBackend):
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
        num_heads, head_dim = query.shape[1], query.shape[2]
        num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
        group = num_heads // num_kv_heads
        out = torch.empty_like(query)
        for s in range(metadata.num_seqs):
            start, end = metadata.query_start_loc_cpu[s], metadata.query_start_loc_cpu[s + 1]
            query_len, seq_len = end - start, metadata.seq_lens_cpu[s]
            num_blocks = -(-seq_len // block_size)
            blocks = metadata.block_tables[s, :num_blocks].long()
            # Gather this request's context from its blocks, in token order.
            k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]  # (S, KVH, D)
            v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]  # (S, KVH, D)
            k = k.repeat_interleave(group, dim=1).float()  # (S, H, D)
            v = v.repeat_interleave(group, dim=1).float()  # (S, H, D)
            q = query[start:end].float()  # (Q, H, D)
            scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # (H, Q, S)
            # New token j sits at position seq_len - query_len + j and sees keys 0..that.
            q_pos = torch.arange(seq_len - query_len, seq_len, device=query.device)
            k_pos = torch.arange(seq_len, device=query.device)
            future = k_pos[None, :] > q_pos[:, None]  # (Q, S)
            scores = scores.masked_fill(future, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[start:end] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
        return out
