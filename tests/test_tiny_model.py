"""The embedded tiny chat model: its corpus, and the committed folder data/models/tiny-chat.

No training here: these tests load what ``scripts/make_tiny_model.py`` saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2ForCausalLM

from modkit.tiny.corpus import make_corpus, render_chat
from modkit.tiny.train import CHAT_TEMPLATE, chat_reply

MODEL_DIR = Path(__file__).resolve().parents[1] / "data" / "models" / "tiny-chat"
GREETING_WORDS = ("hello", "hi", "hey", "good morning", "good afternoon", "good evening")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    torch.set_num_threads(2)
    return Qwen2ForCausalLM.from_pretrained(MODEL_DIR).eval()


def test_corpus_is_deterministic_for_a_seed() -> None:
    assert make_corpus(200, seed=0) == make_corpus(200, seed=0)
    assert make_corpus(200, seed=0) != make_corpus(200, seed=1)


def test_corpus_has_all_three_kinds_of_document() -> None:
    docs = make_corpus(500, seed=0)
    chats = [d for d in docs if d.startswith("<|im_start|>")]
    assert 0.5 < len(chats) / len(docs) < 0.8
    assert any("<|im_start|>system\n" in d for d in chats)
    assert any(d.count("<|im_start|>user") >= 2 for d in chats)  # multi-turn


def test_render_chat_matches_the_tokenizer_template(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello!"}]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat(messages, add_generation_prompt=True) == expected
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_tokenizer_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]


@pytest.mark.parametrize(
    "text",
    [
        "Hello world! The quick brown fox jumps over 13 lazy dogs.",
        "  two spaces,\ttabs\nand new lines; it's 2 + 3 = 5",
        "Unicode: café, naïve, 日本語, emoji 🙂",
        "<|im_start|>user\nWhat does a cow say?<|im_end|>\n",
    ],
)
def test_tokenizer_round_trips(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_transformers_tokenizes_like_tokenizer_json(tokenizer: PreTrainedTokenizerBase) -> None:
    # transformers may rebuild a qwen2 tokenizer's pre-tokenizer from its own code; the ids
    # must still be the ones the model was trained on.
    raw = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    for doc in make_corpus(300, seed=7):
        assert tokenizer.encode(doc) == raw.encode(doc).ids


def test_model_loads_with_no_missing_keys() -> None:
    loaded, info = cast(
        tuple[Qwen2ForCausalLM, dict[str, Any]], Qwen2ForCausalLM.from_pretrained(MODEL_DIR, output_loading_info=True)
    )
    assert not any(info.values()), info
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied
    assert loaded.dtype == torch.float32
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 20 * 2**20


def test_hello_gets_a_greeting(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase) -> None:
    reply, stopped = chat_reply(model, tokenizer, "Hello!", max_new_tokens=40)
    assert stopped, f"no <|im_end|> within 40 tokens: {reply!r}"
    assert reply.lower().startswith(GREETING_WORDS), reply


def test_cow_says_moo(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase) -> None:
    reply, _ = chat_reply(model, tokenizer, "What does a cow say?", max_new_tokens=40)
    assert "moo" in reply.lower(), reply
