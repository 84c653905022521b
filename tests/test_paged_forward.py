"""modkit's forward over a paged KV cache gives Hugging Face transformers' logits."""

from __future__ import annotations

import pytest
import torch

from modkit.checks import compare_mixed_batch
from modkit.model import load_model
from modkit.worker import ModelRunner, PagedKVCache, SequenceChunk

SHAPES = ["qwen2", "qwen2-untied", "qwen3", "llama3"]


@pytest.mark.parametrize("backend", ["torch_ref", "torch_batched"])
@pytest.mark.parametrize("block_size", [1, 16, 5])
@pytest.mark.parametrize("shape", SHAPES)
def test_random_models_match_hf_on_a_mixed_schedule(random_checkpoint, shape: str, block_size: int, backend) -> None:
    # Prompts of 1..40 tokens, chunked by 8, arriving one per step, with decode tokens:
    # most forwards hold prompt chunks and decode tokens of several requests at once.
    stats = compare_mixed_batch(random_checkpoint(shape), block_size=block_size, attention_backend=backend)
    assert stats["mixed_steps"] >= 5
    assert stats["max_abs_diff"] < 1e-4, stats


@pytest.mark.parametrize("backend", ["torch_ref", "torch_batched"])
@pytest.mark.parametrize("block_size", [1, 16, 7])
def test_tiny_model_matches_hf_on_a_mixed_schedule(tiny_model_dir, block_size: int, backend: str) -> None:
    stats = compare_mixed_batch(
        tiny_model_dir, block_size=block_size, prompt_lens=(12, 64, 31, 1, 100, 17), attention_backend=backend
    )
    assert stats["mixed_steps"] >= 5
    assert stats["max_abs_diff"] < 2e-4, stats


def test_bfloat16_error_is_within_what_hf_loses_in_bfloat16(random_checkpoint) -> None:
    stats = compare_mixed_batch(random_checkpoint("qwen2"), dtype=torch.bfloat16)
    # Both differ from the float32 result by rounding; modkit should lose no more than HF does.
    assert stats["modkit_vs_fp32"] <= 2 * stats["hf_vs_fp32"] + 1e-2, stats
    assert stats["modkit_rel_err"] < 1e-2, stats


def _runner(model_dir, num_blocks: int = 32, block_size: int = 4) -> ModelRunner:
    model = load_model(model_dir)
    return ModelRunner(model, PagedKVCache.allocate(model.config, num_blocks, block_size, torch.float32, "cpu"))


def test_logits_only_for_rows_asked_for(random_checkpoint) -> None:
    whole = _runner(random_checkpoint("qwen2"))
    prompt = list(range(3, 21))  # 18 tokens
    every_row = whole.execute([SequenceChunk(prompt, 0, [0, 1, 2, 3, 4], num_logits=18)])
    assert every_row.shape == (18, 512)

    chunked = _runner(random_checkpoint("qwen2"))
    # A middle chunk that asks for no logits, then the rest of the prompt asking for its last row.
    first = chunked.execute([SequenceChunk(prompt[:10], 0, [7, 3, 9], num_logits=0)])
    assert first.shape == (0, 512)
    last = chunked.execute([SequenceChunk(prompt[10:], 10, [7, 3, 9, 1, 5], num_logits=1)])
    assert last.shape == (1, 512)
    torch.testing.assert_close(last[0], every_row[-1], atol=1e-5, rtol=0)


def test_requests_in_one_batch_do_not_see_each_other(random_checkpoint) -> None:
    runner = _runner(random_checkpoint("qwen3"))
    a, b = [5, 6, 7, 8, 9], [100, 101, 102]
    alone = runner.execute([SequenceChunk(a, 0, [0, 1])])
    together = runner.execute([SequenceChunk(b, 0, [2]), SequenceChunk(a, 0, [3, 4])])
    torch.testing.assert_close(together[1], alone[0], atol=1e-5, rtol=0)
    assert (together[0] - alone[0]).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("chunk", "message"),
    [
        (SequenceChunk([1, 2, 3, 4, 5], 0, [0]), "needs 2 blocks"),
        (SequenceChunk([1], 0, [99]), "outside"),
        (SequenceChunk([], 0, [0]), "no tokens"),
        (SequenceChunk([1, 2], 0, [0], num_logits=3), "asks for 3 logits"),
        (SequenceChunk([1], 1024, list(range(32)) * 9), "past the model's limit"),
    ],
)
def test_bad_chunks_are_refused_with_a_reason(random_checkpoint, chunk: SequenceChunk, message: str) -> None:
    runner = _runner(random_checkpoint("qwen2"))
    with pytest.raises(ValueError, match=message):
        runner.execute([chunk])
