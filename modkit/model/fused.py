"""Triton kernels that fuse the decoder's small elementwise steps, for a CUDA GPU.

In eager mode every PyTorch operation is one kernel launch, and a decoder layer's norms,
rotation and activation are many tiny operations (RMSNorm alone: cast, square, mean, add,
rsqrt, multiply, cast, multiply). Prompt steps run eagerly, so those launches add up.
Each kernel here does one of these steps in a single launch:

    rms_norm       y = weight * rmsnorm(x)                       one program per row
    add_rms_norm   r = x + residual; y = weight * rmsnorm(r)     one program per row
    silu_and_mul   silu(gate) * up, gate_up = [gate | up]        (row, column block)
    rotary         q and k rotated by position, GPT-NeoX layout  one program per token

The norms and silu_and_mul round where their PyTorch references in ``modkit.model.layers``
round (statistics in float32, cast back to the input dtype before the weight multiply), so
the two paths agree to float32 noise: in bf16/fp16 nearly every element is bit-equal, the
rest one or two units in the last place apart. rotary computes in float32 and rounds once,
where the reference rounds each product too: a quarter to a third of its bf16/fp16 elements are
one unit in the last place apart (closer to the exact value, if anything). The references
stay the CPU path and the readable one.

Triton is optional: without it (or on the CPU) ``available()`` is False and the layers use
their PyTorch code.
"""

from __future__ import annotations

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(  # type: ignore[no-untyped-def]  # Triton reads these parameters untyped
        x_ptr,  # rows of n_cols: (T, n_cols) or (T, H, n_cols), last dimension contiguous
        residual_ptr,  # (T, n_cols), read only if HAS_RESIDUAL
        out_ptr,  # (rows, n_cols) contiguous
        new_residual_ptr,  # (rows, n_cols) contiguous, written only if HAS_RESIDUAL
        weight_ptr,  # (n_cols,)
        stride_xt,
        stride_xh,
        stride_rt,
        heads,  # rows per token: 1 for hidden states, num_heads for q/k
        n_cols,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,  # n_cols rounded up to a power of two
    ):
        row = tl.program_id(0).to(tl.int64)
        token, head = row // heads, row % heads
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + token * stride_xt + head * stride_xh + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + token * stride_rt + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded to the dtype, as torch adds
            tl.store(new_residual_ptr + row * n_cols + cols, x, mask=mask)
        x32 = x.to(tl.float32)
        variance = tl.sum(x32 * x32, axis=0) / n_cols
        normed = (x32 * tl.rsqrt(variance + eps)).to(x.dtype)  # cast back before the weight, as HF
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
        y = normed.to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(  # type: ignore[no-untyped-def]
        gate_up_ptr,  # (T, 2 * n_cols), gate first, last dimension contiguous
        out_ptr,  # (T, n_cols) contiguous
        stride_t,
        n_cols,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(gate_up_ptr + row * stride_t + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * stride_t + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # silu's output is rounded, then multiplied
        tl.store(out_ptr + row * n_cols + cols, (act * up).to(dtype), mask=mask)

    @triton.jit
    def _rotate_heads(  # type: ignore[no-untyped-def]
        x_ptr,  # (T, num_heads, HEAD_DIM), last dimension contiguous
        out_ptr,  # (T, num_heads, HEAD_DIM) contiguous
        token,
        stride_t,
        stride_h,
        num_heads,
        cos1,  # (1, BLOCK_HALF) float32: cos of the first half of the dimensions
        cos2,  # ... of the second half (equal to the first in standard RoPE, read anyway)
        sin1,
        sin2,
        HEAD_DIM: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        half = HEAD_DIM // 2
        heads = tl.arange(0, BLOCK_H)[:, None]
        cols = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (heads < num_heads) & (cols < half)
        src = x_ptr + token * stride_t + heads * stride_h + cols  # (BLOCK_H, BLOCK_HALF)
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
        # x * cos + cat(-x2, x1) * sin in float32, rounded once. NOTE: not the reference's three
        # roundings (each product, then the sum). Written with casts between, Triton 3.6 on an
        # H100 still did not round as torch does (a product and the sum fused into one multiply-
        # add, it seems), so the kernel does not try to match bit for bit.
        out1 = x1 * cos1 - x2 * sin1
        out2 = x2 * cos2 + x1 * sin2
        dst = out_ptr + token * num_heads * HEAD_DIM + heads * HEAD_DIM + cols
        tl.store(dst, out1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + half, out2.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(  # type: ignore[no-untyped-def]
        q_ptr,
        k_ptr,
        q_out_ptr,
        k_out_ptr,
        cos_ptr,  # (T, HEAD_DIM)
        sin_ptr,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_ct,
        stride_st,
        num_q_heads,
        num_k_heads,
        HEAD_DIM: tl.constexpr,
        BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        half = HEAD_DIM // 2
        cols = tl.arange(0, BLOCK_HALF)[None, :]
        mask = cols < half
        cos1 = tl.load(cos_ptr + token * stride_ct + cols, mask=mask, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + token * stride_ct + half + cols, mask=mask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + token * stride_st + cols, mask=mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + token * stride_st + half + cols, mask=mask, other=0.0).to(tl.float32)
        _rotate_heads(
            q_ptr,
            q_out_ptr,
            token,
            stride_qt,
            stride_qh,
            num_q_heads,
            cos1,
            cos2,
            sin1,
            sin2,
            HEAD_DIM,
            BLOCK_HQ,
            BLOCK_HALF,
        )
        _rotate_heads(
            k_ptr,
            k_out_ptr,
            token,
            stride_kt,
            stride_kh,
            num_k_heads,
            cos1,
            cos2,
            sin1,
            sin2,
            HEAD_DIM,
            BLOCK_HK,
            BLOCK_HALF,
        )


def available(x: torch.Tensor) -> bool:
    """Whether the fused kernels can run on ``x``: it is on a CUDA GPU and Triton is installed."""
    return HAS_TRITON and x.is_cuda


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _row_warps(block: int) -> int:
    """Warps for one program over a row of ``block`` elements: 4 up to 1024, at most 16."""
    return min(max(block // 256, 4), 16)


def _norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the norm kernel: (normed, x + residual) with a residual, else (normed, normed)."""
    n_cols = x.shape[-1]
    assert weight.shape == (n_cols,), f"weight {tuple(weight.shape)} does not fit rows of {n_cols}"
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 3:  # (T, H, D): each head its own row, read through the strides (q and k of a qkv matmul)
        heads, stride_t, stride_h = x.shape[1], x.stride(0), x.stride(1)
    else:
        x = x.reshape(-1, n_cols)
        heads, stride_t, stride_h = 1, x.stride(0), 0
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    new_residual = out
    stride_rt = 0
    if residual is not None:
        assert x.dim() == 2 and residual.shape == x.shape and residual.dtype == x.dtype, "residual must match x"
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
        stride_rt = residual.stride(0)
        new_residual = torch.empty_like(x, memory_format=torch.contiguous_format)
    rows = x.numel() // n_cols
    if rows > 0:
        block = _pow2(n_cols)
        _rms_norm_kernel[(rows,)](
            x,
            residual if residual is not None else x,
            out,
            new_residual,
            weight,
            stride_t,
            stride_h,
            stride_rt,
            heads,
            n_cols,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=_row_warps(block),
        )
    return out, new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * rmsnorm(x)`` over the last dimension; x (..., N), e.g. (T, hidden) or (T, H, D)."""
    out, _ = _norm(x, None, weight, eps)
    return out.view(*x.shape[:-1], x.shape[-1])


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * rmsnorm(x + residual), x + residual)``; x and residual (T, N), same dtype."""
    out, new_residual = _norm(x, residual, weight, eps)
    return out, new_residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for gate_up (T, 2 * I), gate first; returns (T, I)."""
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    num_tokens, n_cols = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(num_tokens, n_cols, dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens > 0:
        block = min(_pow2(n_cols), 1024)
        grid = (num_tokens, triton.cdiv(n_cols, block))
        _silu_and_mul_kernel[grid](gate_up, out, gate_up.stride(0), n_cols, BLOCK=block, num_warps=4)
    return out


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (T, H, D) and k (T, KVH, D) by cos, sin (T, D) in one launch; new tensors.

    The same result as ``apply_rotary`` in ``modkit.model.layers`` (half-split layout). q and
    k may be strided views (slices of one qkv matmul); the outputs are contiguous.
    """
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    assert head_dim % 2 == 0 and k.shape == (num_tokens, num_k_heads, head_dim) and k.dtype == q.dtype
    assert cos.shape == sin.shape == (num_tokens, head_dim), "cos and sin must be (T, head_dim)"
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens > 0:
        _rotary_kernel[(num_tokens,)](
            q,
            k,
            q_out,
            k_out,
            cos,
            sin,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos.stride(0),
            sin.stride(0),
            num_q_heads,
            num_k_heads,
            HEAD_DIM=head_dim,
            BLOCK_HQ=_pow2(num_q_heads),
            BLOCK_HK=_pow2(num_k_heads),
            BLOCK_HALF=_pow2(head_dim // 2),
            num_warps=4,
        )
    return q_out, k_out
