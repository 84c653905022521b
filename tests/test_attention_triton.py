"""The Triton paged-attention backend against the reference backend, on a CUDA GPU.

Randomized flat batches: prompt chunks after cached context and decodes mixed, lengths
across block boundaries, scattered blocks, several block sizes and head layouts (GQA), long
contexts, bf16, fp16 and float32. Skipped, with the reason, where there is no GPU or Triton.
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
    pytest.skip("the triton attention backend needs a CUDA GPU and Triton", allow_module_level=True)

from modkit import LLM, SamplingParams
from modkit.attention import AttentionMetadata, get_attention_backend
from modkit.attention.interface import metadata_from_lengths

CUDA = torch.device("cuda")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # relative to the largest output


def random_metadata(
    rng: random.Random, num_seqs: int, block_size: int, num_blocks: int, max_context: int, max_new: int
) -> AttentionMetadata:
    """Requests with 0..max_context cached and 1..max_new new tokens (a third decodes), scattered blocks."""
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    lens = []
    for _ in range(num_seqs):
        new = 1 if rng.random() < 0.33 else rng.randrange(1, max_new + 1)
        lens.append((rng.choice([0, rng.randrange(0, max_context + 1)]), new))
    lens.sort(key=lambda cn: cn[1] > 1)  # decodes first, as the worker orders them
    tables = [[free.pop() for _ in range(-(-(c + n) // block_size))] for c, n in lens]
    return metadata_from_lengths(lens, tables, block_size, CUDA)


CASES = [
    # (seed, num_seqs, block_size, num_heads, num_kv_heads, head_dim, max_context, max_new)
    (0, 12, 16, 8, 2, 64, 70, 20),
    (1, 7, 1, 4, 4, 32, 40, 9),
    (2, 20, 5, 6, 1, 64, 90, 33),
    (3, 64, 16, 14, 2, 64, 300, 64),  # Qwen2.5-0.5B's heads
    (4, 4, 32, 16, 8, 128, 2000, 300),  # long contexts, long chunks
    (5, 33, 7, 12, 4, 80, 150, 17),  # a head size that is not a power of two
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("seed", "num_seqs", "block_size", "heads", "kv_heads", "head_dim", "max_context", "max_new"), CASES
)
def test_triton_matches_the_reference(
    dtype: torch.dtype,
    seed: int,
    num_seqs: int,
    block_size: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    max_context: int,
    max_new: int,
) -> None:
    rng = random.Random(seed)
    num_blocks = num_seqs * (-(-(max_context + max_new) // block_size)) + 1
    metadata = random_metadata(rng, num_seqs, block_size, num_blocks, max_context, max_new)
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    t = metadata.num_tokens
    q = torch.randn(t, heads, head_dim, generator=gen, device=CUDA).to(dtype)
    k = torch.randn(t, kv_heads, head_dim, generator=gen, device=CUDA).to(dtype)
    v = torch.randn(t, kv_heads, head_dim, generator=gen, device=CUDA).to(dtype)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen, device=CUDA).to(dtype)
    scale = head_dim**-0.5
    expected = get_attention_backend("torch_ref").forward(q, k, v, cache.clone(), metadata, scale).float()
    cache_after = cache.clone()
    got = get_attention_backend("triton").forward(q, k, v, cache_after, metadata, scale).float()
    relative = float((got - expected).abs().max() / expected.abs().max())
    assert relative <= TOLERANCE[dtype], f"relative error {relative:.2e}"
    keys = cache_after[0].view(-1, kv_heads, head_dim)[metadata.slot_mapping]
    assert torch.equal(keys, k), "the new keys were written to their slots"


def test_the_engine_on_the_triton_backend_gives_the_reference_greedy_outputs() -> None:
    prompts = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=24)
    outputs = {}
    for backend in ("torch_batched", "triton"):
        llm = LLM(
            device="cuda", dtype="float32", attention_backend=backend, num_kv_blocks=64, max_num_batched_tokens=48
        )
        outputs[backend] = [o.outputs[0].token_ids for o in llm.chat(prompts, params, use_tqdm=False)]
    assert outputs["triton"] == outputs["torch_batched"]
