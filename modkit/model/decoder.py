"""The decoder-only transformer that modkit's worker runs: Qwen2/Qwen2.5, Qwen3, Llama 3.x.

Parameter names are Hugging Face's (``model.layers.0.self_attn.q_proj.weight`` ...), so a
checkpoint's tensors load by name with no renaming table.

Unlike ``transformers``' modeling code, a forward pass takes a *flat batch* (the new tokens
of many requests end to end, shape ``(num_tokens,)``, no batch dimension, no padding) and
keeps keys and values in a paged KV cache described by ``AttentionMetadata``. See
``modkit.attention.interface`` for the layout.
"""

from __future__ import annotations

import torch
from torch import nn

from modkit.attention import AttentionBackend, AttentionMetadata
from modkit.model.config import ModelConfig
from modkit.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rotary


class Attention(nn.Module):
    """Project to q/k/v, rotate by position, attend over the paged cache, project back."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.backend = backend
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        # Qwen3 normalises each head of q and k before the rotation.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self,
        hidden: torch.Tensor,  # (T, hidden_size)
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # each (T, head_dim)
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, num_kv_heads, head_dim)
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q = self.q_proj(hidden).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos_sin
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.backend.forward(q, k, v, kv_cache, metadata, self.scale)  # (T, H, D)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        hidden: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos_sin, kv_cache, metadata)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DecoderModel(nn.Module):
    """Embeddings, the stack of layers, and the final norm (HF's ``model.`` prefix)."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, backend) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,)
        positions: torch.Tensor,  # (T,)
        kv_caches: list[torch.Tensor],  # one per layer
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # (T, hidden_size)
        cos_sin = self.rotary_emb.cos_sin(positions, hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, cos_sin, kv_cache, metadata)
        return self.norm(hidden)


class CausalLM(nn.Module):
    """The decoder plus its language-model head. Logits come only for the rows asked for."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, backend)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    @property
    def attention_backend(self) -> AttentionBackend:
        """The backend every attention layer calls (they share one)."""
        attention: Attention = self.model.layers[0].self_attn  # type: ignore[assignment]
        return attention.backend

    def tie_weights(self) -> None:
        """With tied embeddings the output head reuses the input embedding matrix."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) int64
        positions: torch.Tensor,  # (T,) int64, each token's position in its own request
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
        logits_indices: torch.Tensor,  # (N,) rows of the flat batch that need logits
    ) -> torch.Tensor:
        """Return float32 logits, shape (N, vocab_size), one row per entry of ``logits_indices``.

        A prompt chunk that ends mid-prompt samples nothing, so asking only for the rows that
        will be sampled skips most of the (large) vocabulary projection.
        """
        hidden = self.model(input_ids, positions, kv_caches, metadata)
        return self.lm_head(hidden[logits_indices]).float()
