"""Building blocks of the decoder: RMSNorm, rotary position embedding, gated MLP.

Each mirrors the numerics of its Hugging Face counterpart (what is computed in
float32 and when it is cast back), so modkit's logits match transformers' closely.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from modkit.model.config import ModelConfig


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), the statistics taken in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class GatedMLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), the SwiGLU feed-forward of Llama and Qwen."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
