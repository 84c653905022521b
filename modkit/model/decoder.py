"""The decoder-only transformer that modkit's worker runs: Qwen2/Qwen2.5, Qwen3, Llama 3.x.

Parameter names are Hugging Face's (``model.layers.0.self_attn.q_proj.weight`` ...), so a
checkpoint's tensors load by name with no renaming table.

Unlike ``transformers``' modeling code, a forward pass takes a *flat batch* (the new tokens
of many requests end to end, shape ``(num_tokens,)``, no batch dimension, no padding) and
keeps keys and values in a paged KV cache described by ``AttentionMetadata``. See
``modkit.attention.interface`` for the layout.

q/k/v and gate/up are single matmuls (``CausalLM.fuse_projections``, done by ``load_model`` on
every device), and on a CUDA GPU with Triton the small steps run as fused kernels
(``modkit.model.fused``); ``CausalLM.use_fused = False`` switches back to the plain PyTorch
path, one matmul per projection.
The residual stream travels beside the hidden states, as in vLLM: each layer returns
``(hidden, residual)`` and the next norm adds the two, so the add and the norm are one kernel::

    residual = embed(ids)   hidden = norm(residual)               (first layer)
    residual += attn(hidden)   hidden = norm(residual)            (post_attention_layernorm)
    residual += mlp(hidden)    hidden = norm(residual)            (next input_layernorm, or the final norm)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from modkit.attention import AttentionBackend, AttentionMetadata
from modkit.model import fused
from modkit.model.config import ModelConfig
from modkit.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rotary, fuse_linears
from modkit.model.parallel import RowParallelLinear, TensorParallel


class Attention(nn.Module):
    """Project to q/k/v, rotate by position, attend over the paged cache, project back.

    After ``fuse_projections`` q, k and v come from one matmul against ``qkv_weight``.
    With tensor parallelism (``modkit.model.parallel``) this rank holds ``num_heads`` of the
    model's ``total_num_heads`` query heads and the KV heads they read; o_proj's all-reduce
    adds the ranks' parts.
    """

    qkv_weight: torch.Tensor | None
    qkv_bias: torch.Tensor | None

    def __init__(self, config: ModelConfig, backend: AttentionBackend, tp: TensorParallel) -> None:
        super().__init__()
        self.total_num_heads, self.total_num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.num_heads = tp.split(config.num_attention_heads, "num_attention_heads")  # this rank's
        self.num_kv_heads = tp.split(config.num_key_value_heads, "num_key_value_heads")
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.backend = backend
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = RowParallelLinear(self.total_num_heads * self.head_dim, config.hidden_size, tp)
        # Qwen3 normalises each head of q and k before the rotation.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.register_buffer("qkv_weight", None, persistent=False)  # ((H + 2 * KVH) * D, hidden) once fused
        self.register_buffer("qkv_bias", None, persistent=False)
        self.use_fused = True

    def fuse_projections(self) -> None:
        """Put q_proj, k_proj and v_proj's weights (and biases) in one tensor for a single matmul.

        NOTE: the parameters keep their Hugging Face names but become views into the fused
        tensor: one copy of the weights, never stale. Run once, after the weights are loaded.
        """
        projections = [self.q_proj, self.k_proj, self.v_proj]
        self.qkv_weight = fuse_linears(projections, "weight")
        self.qkv_bias = fuse_linears(projections, "bias")

    def project_qkv(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (T, H, D), k and v (T, KVH, D); with fused weights, strided views of one matmul's output."""
        num_tokens = hidden.shape[0]
        if self.use_fused and self.qkv_weight is not None:
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            qkv = F.linear(hidden, self.qkv_weight, self.qkv_bias)  # (T, (H + 2 * KVH) * D)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        else:
            q, k, v = self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)
        return (
            q.view(num_tokens, self.num_heads, self.head_dim),
            k.view(num_tokens, self.num_kv_heads, self.head_dim),
            v.view(num_tokens, self.num_kv_heads, self.head_dim),
        )

    def forward(
        self,
        hidden: torch.Tensor,  # (T, hidden_size)
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # each (T, head_dim)
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, num_kv_heads, head_dim)
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.project_qkv(hidden)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos_sin
        if self.use_fused and fused.available(q):
            q, k = fused.rotary(q, k, cos, sin)  # both in one launch
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.backend.forward(q, k, v, kv_cache, metadata, self.scale)  # (T, H, D)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)), the residual carried beside.

    Takes and returns ``(hidden, residual)``: ``hidden`` is the last sub-block's output not
    yet added to the stream, ``residual`` the stream (None before the first layer, where the
    embeddings are the stream). The sum ``hidden + residual`` is what HF calls the layer's output.
    """

    def __init__(self, config: ModelConfig, backend: AttentionBackend, tp: TensorParallel) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, backend, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, tp)

    def forward(
        self,
        hidden: torch.Tensor,  # (T, hidden_size)
        residual: torch.Tensor | None,  # (T, hidden_size)
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(hidden, cos_sin, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    """Embeddings, the stack of layers, and the final norm (HF's ``model.`` prefix)."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend, tp: TensorParallel) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)  # replicated on every rank
        self.layers = nn.ModuleList(DecoderLayer(config, backend, tp) for _ in range(config.num_hidden_layers))
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
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, cos_sin, kv_cache, metadata)
        if residual is None:  # no layers
            return self.norm(hidden)
        hidden, _ = self.norm.add_and_norm(hidden, residual)
        return hidden


class CausalLM(nn.Module):
    """The decoder plus its language-model head. Logits come only for the rows asked for.

    ``tp``: this model's rank among the tensor-parallel ranks of one worker; the default, rank 0
    of 1, holds every weight. ``config`` is always the whole model's shape.
    """

    def __init__(self, config: ModelConfig, backend: AttentionBackend, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp if tp is not None else TensorParallel()
        self.model = DecoderModel(config, backend, self.tp)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # replicated on every rank
        self.tie_weights()

    @property
    def attention_backend(self) -> AttentionBackend:
        """The backend every attention layer calls (they share one)."""
        attention: Attention = self.model.layers[0].self_attn  # type: ignore[assignment]
        return attention.backend

    @property
    def use_fused(self) -> bool:
        """Whether the layers take the fused path (Triton kernels on a CUDA GPU, fused matmuls).

        True by default. On the CPU or without Triton only the joined matmuls apply (the kernels
        cannot run there), and those only once ``fuse_projections`` has run. Setting it sets
        every layer's own ``use_fused``, so ``model.use_fused = False`` runs the reference path.
        """
        return all(module.use_fused for module in self._fusable_modules())

    @use_fused.setter
    def use_fused(self, on: bool) -> None:
        for module in self._fusable_modules():
            module.use_fused = on

    def _fusable_modules(self) -> list[RMSNorm | GatedMLP | Attention]:
        return [m for m in self.modules() if isinstance(m, RMSNorm | GatedMLP | Attention)]

    def fuse_projections(self) -> None:
        """Join q/k/v and gate/up weights for one matmul each; ``load_model`` does it on every device.

        Run once, after the weights are loaded. Parameter names and values stay as they are
        (the parameters become views of the joined tensors: no extra memory, never stale), so
        checkpoints still load by name. The embeddings and the (maybe tied) head are untouched.
        """
        for module in self.modules():
            if isinstance(module, Attention | GatedMLP):
                module.fuse_projections()

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
