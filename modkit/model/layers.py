"""Building blocks of the decoder: RMSNorm, rotary position embedding, gated MLP.

Each mirrors the numerics of its Hugging Face counterpart (what is computed in
float32 and when it is cast back), so modkit's logits match transformers' closely.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from modkit.model import fused
from modkit.model.config import ModelConfig
from modkit.model.parallel import RowParallelLinear, TensorParallel


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), the statistics taken in float32.

    ``add_and_norm`` also adds the residual stream first, the way vLLM's layers pass it on:
    one kernel on a GPU instead of an add and a norm. ``use_fused`` picks the Triton kernels
    of ``modkit.model.fused`` when the input is on a CUDA GPU and Triton is installed.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.use_fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fused and fused.available(x):
            return fused.rms_norm(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the new residual stream and its normalised copy."""
        if self.use_fused and fused.available(x):
            return fused.add_rms_norm(x, residual, self.weight, self.eps)
        residual = x + residual
        return rms_norm_reference(residual, self.weight, self.eps), residual


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in plain PyTorch, rounding where Hugging Face's does: cast back, then scale."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class GatedMLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), the SwiGLU feed-forward of Llama and Qwen.

    After ``fuse_projections`` (done once, after loading) gate and up are one matmul
    against ``gate_up_weight``; with ``use_fused`` and a CUDA input, silu * up is one kernel.
    With tensor parallelism each rank holds ``intermediate_size / size`` rows of gate and up
    and the matching columns of down_proj, whose all-reduce adds the ranks' parts.
    """

    gate_up_weight: torch.Tensor | None

    def __init__(self, hidden_size: int, intermediate_size: int, tp: TensorParallel | None = None) -> None:
        super().__init__()
        tp = tp if tp is not None else TensorParallel()
        local = tp.split(intermediate_size, "intermediate_size")  # this rank's share
        self.gate_proj = nn.Linear(hidden_size, local, bias=False)
        self.up_proj = nn.Linear(hidden_size, local, bias=False)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp)
        self.register_buffer("gate_up_weight", None, persistent=False)  # (2 * I, hidden) once fused
        self.use_fused = True

    def fuse_projections(self) -> None:
        """Put gate_proj and up_proj's weights in one (2 * I, hidden) tensor for a single matmul.

        NOTE: the parameters keep their Hugging Face names but become views into the fused
        tensor, so there is one copy of the weights (no extra memory) and writing either
        (loading a checkpoint again) updates both. Run once, after the weights are loaded.
        """
        self.gate_up_weight = fuse_linears([self.gate_proj, self.up_proj], "weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fused and self.gate_up_weight is not None:
            gate_up = F.linear(x, self.gate_up_weight)  # (T, 2 * I), gate first
            if fused.available(gate_up):
                return self.down_proj(fused.silu_and_mul(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def fuse_linears(linears: list[nn.Linear], name: str) -> torch.Tensor | None:
    """Concatenate the layers' ``name`` ("weight" or "bias") along the output dimension.

    Each layer's parameter becomes a view into the result, so the weights are stored once.
    None if a layer has no such parameter (no bias).
    """
    params: list[torch.Tensor | None] = [getattr(linear, name) for linear in linears]
    if any(param is None for param in params):
        return None
    with torch.no_grad():
        joined = torch.cat([param for param in params if param is not None])
    parts = joined.split([linear.out_features for linear in linears])
    for linear, part in zip(linears, parts, strict=True):
        setattr(linear, name, nn.Parameter(part, requires_grad=False))
    return joined


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of RoPE, shape (head_dim // 2,), float32, on the CPU.

    ``linear`` scaling divides every frequency by ``factor``. ``llama3`` scaling (Llama 3.1+)
    divides only the low frequencies (wavelengths longer than the original context over
    ``low_freq_factor``), keeps the high ones, and blends smoothly in between.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_context / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        in_between = (wavelen <= old_context / low) & (wavelen >= old_context / high)
        return torch.where(in_between, blended, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotates query and key heads by angles proportional to each token's position.

    Positions come from the batch, not from the token's index in it: in a flat batch a
    decode token of a long request and the first token of a new prompt sit side by side.
    """

    inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def reset_inv_freq(self) -> None:
        """Recompute the table in float32 (after ``to_empty`` or a dtype cast changed it)."""
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables for these positions, each (num_tokens, head_dim)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, num_heads, head_dim); cos, sin: (T, head_dim). Half-split (GPT-NeoX) layout."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
