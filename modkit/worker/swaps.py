"""Swapping a worker's attention backend while it serves: its trial probe and its guard.

The mechanism (trial, guard, rollback) is ``modkit.guard``; the worker swaps its backend
between two steps (``modkit.worker.swapping``), since its one loop is not inside a step
while it answers a call. What is the attention backend's own is here:

1. **Trial** (``try_attention``). The new backend runs on a probe batch (a prompt chunk
   after cached context, and decodes) in a scratch KV cache, and its output must match the
   backend in charge. A failure raises at the swap, and nothing changes.
2. **Guard** (``GuardedAttention``). Every layer calls the new backend through a guard that
   holds the one it replaced: if it raises in a step, the old one answers that layer's call
   (the step and its requests go on), and the worker puts the old one back after the step.

The sampler's trial and guard live in its own package (``modkit.sampler.swaps``): the
sampler process tries a new sampler too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modkit.attention import AttentionBackend, AttentionMetadata
from modkit.attention.interface import metadata_from_lengths
from modkit.guard import Guarded
from modkit.model.config import ModelConfig


class GuardedAttention(Guarded[AttentionBackend], AttentionBackend):
    """A swapped-in attention backend with the one it replaced as its fallback."""

    def __init__(self, candidate: AttentionBackend, fallback: AttentionBackend) -> None:
        super().__init__(candidate, fallback)
        self.name = getattr(candidate, "name", type(candidate).__qualname__)  # type: ignore[misc]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        # If the candidate raised after writing the new keys and values, the fallback writes
        # them again: harmless, the same values to the same slots.
        return self.guarded("forward", lambda b: b.forward(query, key, value, kv_cache, metadata, scale))


def attention_layers(model: nn.Module) -> list[Any]:
    """The model's attention modules: each holds the backend it calls (``.backend``)."""
    return [m for m in model.modules() if isinstance(getattr(m, "backend", None), AttentionBackend)]


def set_attention_backend(model: nn.Module, backend: AttentionBackend) -> None:
    for layer in attention_layers(model):
        layer.backend = backend


@torch.inference_mode()  # as in a step: backends may keep workspaces made there
def try_attention(
    backend: AttentionBackend,
    reference: AttentionBackend,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
) -> float:
    """Run both backends on one probe batch; raises unless the outputs agree. Returns the largest difference.

    The probe: two decodes, a 9-token prompt chunk after 7 cached tokens, and a fresh
    5-token prompt, over blocks of 4 tokens in a scratch cache (the worker's own cache is not
    touched). The cached context is written first, by the reference.
    """
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    block_size, num_blocks = 4, 24
    generator = torch.Generator(device="cpu").manual_seed(0)
    # (context already cached, new tokens) per sequence, decodes first as the worker orders them.
    shapes = [(12, 1), (3, 1), (7, 9), (0, 5)]
    tables, next_block = [], 1
    for cached, new in shapes:
        count = -(-(cached + new) // block_size)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count

    def metadata(part: str) -> AttentionMetadata:
        """``part`` "context": each sequence's cached tokens; "new": its new tokens over all of it."""
        rows = [i for i, (cached, new) in enumerate(shapes) if (cached if part == "context" else new)]
        lengths = [(0, shapes[i][0]) if part == "context" else shapes[i] for i in rows]
        return metadata_from_lengths(lengths, [tables[i] for i in rows], block_size, device)

    def qkv(num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shapes_ = [(num_tokens, heads, head_dim), (num_tokens, kv_heads, head_dim), (num_tokens, kv_heads, head_dim)]
        q, k, v = (torch.randn(s, generator=generator).to(device=device, dtype=dtype) for s in shapes_)
        return q, k, v

    scale = head_dim**-0.5
    context_metadata, new_metadata = metadata("context"), metadata("new")
    ctx_q, ctx_k, ctx_v = qkv(context_metadata.num_tokens)
    q, k, v = qkv(new_metadata.num_tokens)
    outputs = []
    for candidate in (reference, backend):
        cache = torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
        reference.forward(ctx_q, ctx_k, ctx_v, cache, context_metadata, scale)
        outputs.append(candidate.forward(q, k, v, cache, new_metadata, scale).float())
    expected, got = outputs
    if got.shape != expected.shape:
        raise ValueError(f"attention output has shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    difference = float((got - expected).abs().max())
    tolerance = 1e-3 if dtype == torch.float32 else 2e-2
    if not difference <= tolerance:
        raise ValueError(f"attention output differs from the backend in charge by {difference:.3g} (> {tolerance})")
    return difference
