"""Swapping a worker's sampler or attention backend while it serves: trial first, then a guard.

Both live next to the model, so the worker itself swaps them, between two steps (its one
loop is not inside a step while it answers a call):

1. **Trial.** The new implementation runs on a small probe before it takes over: a sampler
   on random logits with greedy, seeded, penalised and logprob rows; an attention backend
   on a probe batch (a prompt chunk after cached context, and decodes) in a scratch KV
   cache, and its output must match the backend in charge. A failure raises at the swap,
   and nothing changes.
2. **Guard.** The new implementation runs inside a ``Guarded...`` wrapper that holds the
   one it replaced. If it raises in a step, that call is answered by the old one (the step
   and its requests go on), ``error`` records why, and the worker puts the old one back
   after the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modkit.attention import AttentionBackend, AttentionMetadata
from modkit.attention.interface import metadata_from_lengths
from modkit.model.config import ModelConfig
from modkit.sampler import Sampler, SamplerOutput, SamplingState
from modkit.sampling_params import SamplingParams

# -- samplers ----------------------------------------------------------------------------------


class GuardedSampler(Sampler):
    """A swapped-in sampler with the one it replaced as its fallback."""

    def __init__(self, sampler: Sampler, fallback: Sampler) -> None:
        super().__init__(sampler.seed)
        self.sampler, self.fallback = sampler, fallback
        self.error: str | None = None

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
        if self.error is None:
            try:
                output = self.sampler.sample(logits, states)
                check_sampler_output(output, len(states), logits.shape[1])
                return output
            except Exception as error:
                self.error = f"{type(error).__name__} in sample(): {error}"
        return self.fallback.sample(logits, states)


def check_sampler_output(output: SamplerOutput, num_rows: int, vocab_size: int) -> None:
    ids = output.sampled_token_ids
    if tuple(ids.shape) != (num_rows,):
        raise ValueError(f"sampled {tuple(ids.shape)} token ids for {num_rows} rows")
    if num_rows and not (int(ids.min()) >= 0 and int(ids.max()) < vocab_size):
        raise ValueError(f"sampled a token id outside the vocabulary [0, {vocab_size})")


@torch.inference_mode()
def try_sampler(sampler: Sampler, vocab_size: int, device: torch.device) -> None:
    """Sample a probe batch: raises if the sampler fails or returns ids that cannot be tokens."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(5, vocab_size, generator=generator) * 3).to(device)
    prompt = [1, 2, 2, 3]
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=1, logprobs=2),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0, repetition_penalty=1.2, presence_penalty=0.5, min_tokens=2),
        SamplingParams(temperature=0.9, min_p=0.1, logit_bias={1: 2.0}),
    ]
    states = [SamplingState.create(p, prompt, device, eos_token_ids=(0,)) for p in params]
    output = sampler.sample(logits, states)
    check_sampler_output(output, len(states), vocab_size)
    output.to_lists()


# -- attention backends ------------------------------------------------------------------------


class GuardedAttention(AttentionBackend):
    """A swapped-in attention backend with the one it replaced as its fallback."""

    def __init__(self, backend: AttentionBackend, fallback: AttentionBackend) -> None:
        self.backend, self.fallback = backend, fallback
        self.name = getattr(backend, "name", type(backend).__qualname__)  # type: ignore[misc]
        self.error: str | None = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if self.error is None:
            try:
                return self.backend.forward(query, key, value, kv_cache, metadata, scale)
            except Exception as error:
                self.error = f"{type(error).__name__} in forward(): {error}"
        # Writing the new keys and values again is harmless: the same values to the same slots.
        return self.fallback.forward(query, key, value, kv_cache, metadata, scale)


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
