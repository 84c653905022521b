"""Random-weight checkpoints with the embedded model's tokenizer (``make_random_checkpoint(tokenizer="embedded")``).

The lessons run on such a checkpoint in place of the tiny model: its tokenizer must encode
text exactly as the embedded one does, turn every id a large random model samples into text,
keep the chat template and stop on the same eos id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from modkit import LLM, SamplingParams
from modkit.checks import load_hf_model, make_random_checkpoint, write_embedded_tokenizer
from modkit.model import ModelConfig, embedded_model_dir

TEXTS = [
    "Once upon a time there was a little fox who loved the moon.",
    "Tell me a story about a dragon named Pip.\n\nThe end?",
    "numbers 1234567890, punctuation !?;:'\"()[]{} and   spaces\ttabs",
    "Ünïcödé, 日本語 and emoji 🙂 are bytes to a byte-level BPE",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "",
]
CHAT = [{"role": "system", "content": "You are a storyteller."}, {"role": "user", "content": "A story, please."}]


def chat_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """CHAT rendered by the tokenizer's chat template, then encoded."""
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def embedded_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="module")
def large_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tokenizer grown to Qwen2.5-0.5B's vocabulary (the weights are not needed here)."""
    folder = tmp_path_factory.mktemp("qwen2.5-0.5b-tokenizer")
    write_embedded_tokenizer(folder, vocab_size=151936, model_max_length=32768)
    return folder


def test_encoding_is_the_embedded_tokenizers(
    embedded_tokenizer: PreTrainedTokenizerBase, large_vocab_dir: Path
) -> None:
    grown = AutoTokenizer.from_pretrained(large_vocab_dir)
    assert len(grown) == 151936 and len(embedded_tokenizer) < 3000
    for text in TEXTS:
        assert grown.encode(text, add_special_tokens=False) == embedded_tokenizer.encode(text, add_special_tokens=False)
    assert chat_ids(grown) == chat_ids(embedded_tokenizer) and 1 in chat_ids(grown), "<|im_start|> is id 1"
    assert grown.eos_token_id == embedded_tokenizer.eos_token_id == 2


def test_every_id_decodes_to_text(embedded_tokenizer: PreTrainedTokenizerBase, large_vocab_dir: Path) -> None:
    grown = AutoTokenizer.from_pretrained(large_vocab_dir)
    texts = grown.batch_decode([[i] for i in range(151936)])
    assert all(texts), [i for i, t in enumerate(texts) if not t][:10]
    old = len(embedded_tokenizer)
    assert texts[:old] == embedded_tokenizer.batch_decode([[i] for i in range(old)]), "the embedded ids keep their text"
    assert len(set(texts[old:])) == len(texts) - old, "each new id its own word"
    assert max(len(t) for t in texts[old:]) <= 6, "short words, as a real model's tokens are"


def test_checkpoint_takes_the_embedded_ids(tmp_path: Path) -> None:
    folder = make_random_checkpoint("qwen2", tmp_path, tokenizer="embedded")
    ours, embedded = ModelConfig.from_pretrained(folder), ModelConfig.from_pretrained(embedded_model_dir())
    assert ours.vocab_size == embedded.vocab_size and ours.eos_token_ids == embedded.eos_token_ids
    assert ours.hidden_size != embedded.hidden_size, "the shape is the random model's"
    template = AutoTokenizer.from_pretrained(embedded_model_dir()).chat_template
    assert AutoTokenizer.from_pretrained(folder).chat_template == template


def test_a_chat_on_a_random_model_is_hfs_greedy(tmp_path: Path, embedded_tokenizer: PreTrainedTokenizerBase) -> None:
    """modkit's LLM serves a chat on the checkpoint: the prompt as the embedded template renders it,
    HF's greedy tokens, and text that is those tokens decoded."""
    folder = make_random_checkpoint("qwen2", tmp_path, tokenizer="embedded")
    llm = LLM(str(folder), device="cpu", dtype="float32", num_kv_blocks=16)
    [reply] = llm.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    prompt = chat_ids(embedded_tokenizer)
    assert reply.prompt_token_ids == prompt
    hf = load_hf_model(folder, torch.float32, "cpu")
    ids = torch.tensor([prompt])
    expected = cast(Any, hf).generate(  # cast: transformers' stubs for generate() differ between releases
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
    )
    assert reply.outputs[0].token_ids == expected[0, len(prompt) :].tolist()
    assert reply.outputs[0].text == llm.get_tokenizer().decode(reply.outputs[0].token_ids) != ""
