"""Greedy decoding over modkit's paged forward reproduces transformers' generate exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modkit.checks import compare_greedy
from modkit.model import encode_chat, load_model, load_tokenizer
from modkit.worker import ModelRunner, PagedKVCache, greedy_generate

REPO = Path(__file__).resolve().parents[1]
GREETINGS = ("hello", "hi", "hey", "good morning", "good evening", "good afternoon", "greetings")

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "What does a cow say?"}],
    [{"role": "user", "content": "What is 2 plus 3?"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Who are you?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "What color is the sky?"},
    ],
    [{"role": "user", "content": "Tell me a story about a cat."}],
    [{"role": "user", "content": "What is the opposite of hot?"}],
]


@pytest.mark.parametrize("block_size", [16, 5])
def test_greedy_tokens_equal_hf_generate(tiny_model_dir: Path, block_size: int) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    prompts = [encode_chat(tokenizer, c) for c in CONVERSATIONS]
    assert len({len(p) for p in prompts}) >= 6, "prompts of different lengths"
    result = compare_greedy(tiny_model_dir, prompts, max_new_tokens=32, block_size=block_size)
    assert result.ours == result.theirs, result.first_divergence
    assert all(len(tokens) >= 3 for tokens in result.ours)


def test_tiny_model_answers_hello_through_the_paged_forward(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    runner = ModelRunner(model, PagedKVCache.allocate(model.config, 8, 16, torch.float32, "cpu"))
    prompt = encode_chat(tokenizer, [{"role": "user", "content": "Hello!"}])
    [output] = greedy_generate(runner, [prompt], 40, model.config.eos_token_ids)
    assert output[-1] in model.config.eos_token_ids, "the reply ends by itself"
    reply = tokenizer.decode(output, skip_special_tokens=True).strip()
    assert reply.lower().startswith(GREETINGS), reply
    assert reply.endswith((".", "!", "?")) and len(reply.split()) <= 20, reply


@pytest.mark.slow
def test_generate_script_chats_from_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate.py"), "Hello!", "What does a cow say?"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert ">>> What does a cow say?" in done.stdout
    assert "moo" in done.stdout.lower()
    assert "2 requests" in done.stdout
