"""Every registered attention backend computes what the reference backend computes."""

from __future__ import annotations

import random

import pytest
import torch

from modkit.attention import (
    AttentionBackend,
    AttentionMetadata,
    attention_backends,
    get_attention_backend,
    resolve_attention_backend,
)
from modkit.attention.interface import ATTENTION_BACKENDS
from modkit.model import load_model
from modkit.worker import ModelRunner, PagedKVCache, SequenceChunk


def random_batch(runner: ModelRunner, seed: int, num_seqs: int, decodes_first: bool) -> AttentionMetadata:
    """Metadata for random requests (context 1..70 tokens, 1..20 of them new) with scattered blocks."""
    rng = random.Random(seed)
    free = list(range(1, runner.kv_cache.num_blocks))
    rng.shuffle(free)
    chunks = []
    for _ in range(num_seqs):
        computed = rng.choice([0, rng.randrange(1, 50)])
        new = rng.choice([1, rng.randrange(1, 21)])
        table = [free.pop() for _ in range(-(-(computed + new) // runner.kv_cache.block_size))]
        chunks.append(SequenceChunk([0] * new, computed, table))
    if decodes_first:  # as the worker orders them
        chunks.sort(key=lambda c: len(c.token_ids) > 1)
    return runner.prepare(chunks).metadata


@pytest.mark.parametrize("decodes_first", [False, True])
# "triton" needs a CUDA GPU: tests/test_attention_triton.py checks it there; "auto" is torch_batched on a CPU.
@pytest.mark.parametrize("backend", [b for b in attention_backends() if b not in ("torch_ref", "triton", "auto")])
@pytest.mark.parametrize(
    ("seed", "block_size", "heads"), [(0, 16, (8, 2)), (1, 1, (4, 4)), (2, 5, (6, 1)), (3, 7, (4, 2))]
)
def test_backend_matches_reference(
    random_checkpoint, decodes_first: bool, backend: str, seed: int, block_size: int, heads: tuple[int, int]
) -> None:
    num_heads, num_kv_heads = heads
    model = load_model(random_checkpoint("qwen2"))
    runner = ModelRunner(model, PagedKVCache.allocate(model.config, 256, block_size, torch.float32, "cpu"))
    metadata = random_batch(runner, seed, num_seqs=12, decodes_first=decodes_first)
    gen = torch.Generator().manual_seed(seed)
    t = metadata.num_tokens
    q = torch.randn(t, num_heads, 32, generator=gen)
    k = torch.randn(t, num_kv_heads, 32, generator=gen)
    v = torch.randn(t, num_kv_heads, 32, generator=gen)
    # The cache already holds random context for earlier tokens; both backends see the same.
    cache = torch.randn(2, 256, block_size, num_kv_heads, 32, generator=gen)
    expected = get_attention_backend("torch_ref").forward(q, k, v, cache.clone(), metadata, 0.2)
    got = get_attention_backend(backend).forward(q, k, v, cache.clone(), metadata, 0.2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_auto_picks_triton_on_a_gpu_and_falls_back_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "auto": the PyTorch backend on a CPU, and on a GPU whose torch has no Triton (no import needed to decide)."""
    assert resolve_attention_backend("auto", "cpu") == "torch_batched"
    assert resolve_attention_backend("torch_ref", "cuda") == "torch_ref", "a named backend is kept"
    real_get = ATTENTION_BACKENDS.get

    def without_triton(name: str) -> type[AttentionBackend]:
        if name == "triton":
            raise ImportError("the 'triton' attention backend needs Triton")
        return real_get(name)

    monkeypatch.setattr(ATTENTION_BACKENDS, "get", without_triton)
    assert resolve_attention_backend("auto", "cuda:0") == "torch_batched"
    assert not get_attention_backend("auto", "cpu").supports_cuda_graphs, "so no CUDA graphs are captured"
