"""Paged attention in one Triton kernel: a flat batch of prompt chunks and decodes, read from the blocks.

One program computes a few new tokens of one request for every query head that shares one
key/value head (grouped-query attention), and walks that request's context in tiles of
``BLOCK_N`` tokens, flash-attention style (a running maximum and sum, so the scores never
sit in memory whole). Each key and value tile is loaded once for the whole group::

    grid = (num_seqs, num_kv_heads, ceil(max_query_len / TOKENS))

    query tile:  BLOCK_M rows = TOKENS tokens x GROUP query heads of request s
                 (a decode: 1 token x 7 heads for Qwen2.5-0.5B, in a tile of 16 rows)
    key tile n:  positions n0 .. n0+BLOCK_N of request s, each read from its block:
                 slot = block_tables[s, pos // block_size] * block_size + pos % block_size
    causal:      key pos <= query pos; tiles past the tile's last query position are skipped

Query head ``h`` reads key/value head ``h // GROUP``. Any block
size works, since keys are gathered token by token through the block table; variable query
lengths need no padding beyond the last tile of each request. Scores and the softmax are
float32 whatever the cache's dtype (bf16 or fp16 on a GPU; float32 gives IEEE products, not
TF32). New keys and values are written to the cache first, as every backend does.

Needs a CUDA GPU and Triton; the reference backends stay for the CPU and for reading.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - depends on the machine
    raise ImportError("the 'triton' attention backend needs Triton (it comes with CUDA builds of torch)") from error

from modkit.attention.interface import AttentionBackend, AttentionMetadata, write_to_kv_cache


@triton.jit
def _paged_attention_kernel(  # type: ignore[no-untyped-def]  # Triton reads these parameters untyped
    q_ptr,  # (T, H, D)
    k_ptr,  # keys of the cache, viewed as (num_blocks * block_size, KVH, D)
    v_ptr,
    o_ptr,  # (T, H, D)
    query_start_loc_ptr,  # (S + 1,) int32
    seq_lens_ptr,  # (S,) int32
    block_tables_ptr,  # (S, max_blocks) int32
    scale,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV block
    GROUP: tl.constexpr,  # query heads per key/value head
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    BLOCK_M: tl.constexpr,  # rows of a tile: (token, query head) pairs
    TOKENS: tl.constexpr,  # tokens per tile: BLOCK_M // GROUP
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for float32 inputs (exact products, not TF32); ignored for half types
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    m_block = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if m_block * TOKENS >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len  # tokens already in the cache before this step's

    # Row r of the tile: token m_block * TOKENS + r // GROUP, query head kv_head * GROUP + r % GROUP.
    # The query heads that share a key/value head share each key and value tile.
    offs_r = tl.arange(0, BLOCK_M)
    token = m_block * TOKENS + offs_r // GROUP
    head = kv_head * GROUP + offs_r % GROUP
    mask_m = (offs_r < TOKENS * GROUP) & (token < query_len)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    q_pos = context_len + token  # absolute position of each row's token

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys past this tile's last token are never visible to it.
    kv_end = tl.minimum(seq_len, context_len + (m_block + 1) * TOKENS)
    for n0 in range(0, kv_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_end
        block = tl.load(block_tables_ptr + seq * stride_bt + offs_n // BLOCK_SIZE, mask=mask_n, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + slot[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + slot[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(
        o_ptr + (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


class TritonPagedAttention(AttentionBackend):
    """Registered lazily as "triton" (``modkit.attention``): importing it needs Triton."""

    BLOCK_N = 32  # context tokens per tile
    supports_cuda_graphs = True  # one launch, its grid fixed by (num_seqs, max_query_len)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if not query.is_cuda:
            raise RuntimeError("the 'triton' attention backend runs on a CUDA GPU; use torch_batched on the CPU")
        write_to_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        query = query.contiguous()
        _, num_heads, head_dim = query.shape
        _, num_blocks, block_size, num_kv_heads, _ = kv_cache.shape
        keys = kv_cache[0].view(num_blocks * block_size, num_kv_heads, head_dim)
        values = kv_cache[1].view(num_blocks * block_size, num_kv_heads, head_dim)
        out = torch.empty_like(query)
        group = num_heads // num_kv_heads
        # Rows of a tile: 16 for a step of decodes (one token, its group of query heads), else 64.
        # tl.dot needs 16 rows or more, and a row per query head of the group at least.
        max_query_len = metadata.max_query_len
        block_m = max(16 if max_query_len == 1 else 64, triton.next_power_of_2(group))
        tokens = block_m // group
        grid = (metadata.num_seqs, num_kv_heads, triton.cdiv(max_query_len, tokens))
        block_tables = metadata.block_tables
        _paged_attention_kernel[grid](
            query,
            keys,
            values,
            out,
            metadata.query_start_loc,
            metadata.seq_lens,
            block_tables,
            scale,
            query.stride(0),
            query.stride(1),
            keys.stride(0),
            keys.stride(1),
            values.stride(0),
            values.stride(1),
            out.stride(0),
            out.stride(1),
            block_tables.stride(0),
            BLOCK_SIZE=block_size,
            GROUP=group,
            HEAD_DIM=head_dim,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            BLOCK_M=block_m,
            TOKENS=tokens,
            BLOCK_N=self.BLOCK_N,
            PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        )
        return out
