"""IncrementalDetokenizer: streamed text equals a full decode, never shows half a character, and stops like vLLM.

Every test runs twice: with ``tokenizers``' DecodeStream (the fast path) and with the Python offsets.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from modkit.engine.detokenizer import IncrementalDetokenizer

TINY_CHAT = Path(__file__).resolve().parents[1] / "data/models/tiny-chat"

TEXTS = [
    "The cat sat on the mat.",
    "Hello world, café naïve 🎉 日本語 👩‍👩‍👧",
    "Ünïcödé façade — déjà vu, crème brûlée",
    "Привет, мир! Γειά σου κόσμε. 你好，世界",
    "emoji: 🚀🔥👍🏽 flags 🇫🇷🇯🇵 and math ∑∫√",
]


def mixed_script_bpe() -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on mixed scripts: it merges some multi-byte characters, not others."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS[1:] * 3 + ["日本語の文章と中文的句子，还有 한국어 문장。"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module", params=["tiny-chat", "mixed-bpe"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    if request.param == "tiny-chat":
        return AutoTokenizer.from_pretrained(TINY_CHAT)
    return mixed_script_bpe()


Detokenizer = Callable[..., IncrementalDetokenizer]


@pytest.fixture(params=[True, False], ids=["decode-stream", "python"])
def make(request: pytest.FixtureRequest) -> Detokenizer:
    """``IncrementalDetokenizer`` with its Rust fast path on or off."""
    return functools.partial(IncrementalDetokenizer, decode_stream=request.param)


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    """Feed ids `chunk` at a time, finishing with the last update; return every delta."""
    deltas = []
    for i in range(0, len(ids), chunk):
        detok.update(ids[i : i + chunk], finished=i + chunk >= len(ids))
        deltas.append(detok.get_delta())
        if detok.finished:
            break
    return deltas


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def test_multibyte_characters_never_stream_half_decoded(make: Detokenizer, tokenizer: PreTrainedTokenizerBase) -> None:
    split_chars = 0
    for text in TEXTS:
        ids = encode(tokenizer, text)
        split_chars += sum("\ufffd" in tokenizer.decode([i]) for i in ids)
        deltas = stream(make(tokenizer, encode(tokenizer, "Say: ")), ids)
        assert not any("\ufffd" in d for d in deltas), deltas
        assert "".join(deltas) == tokenizer.decode(ids) == text
    assert split_chars > 10, "the texts should split characters across tokens, or this test proves nothing"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_tokens_equal_full_decode(
    make: Detokenizer, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool
) -> None:
    rng = random.Random(0)
    vocab = len(tokenizer)
    for trial in range(150):
        prompt = encode(tokenizer, rng.choice(TEXTS))
        if trial % 2:  # random ids, whose tail may start mid-character, as the tail of an encoded text can
            prompt = [rng.randrange(vocab) for _ in range(8)]
            while tokenizer.decode(prompt, skip_special_tokens=skip_special_tokens).endswith(
                "\ufffd"
            ):  # but, as a text's, it ends on a whole one
                prompt.pop()
        ids = [rng.randrange(vocab + 8) for _ in range(rng.randrange(1, 40))]  # models pad their vocabulary
        detok = make(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
        deltas = stream(detok, ids, chunk=rng.randrange(1, 4))
        expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert detok.output_text == "".join(deltas) == expected


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens(make: Detokenizer, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool) -> None:
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [*encode(tokenizer, "Hi there 🎉"), eos]
    detok = make(tokenizer, [], skip_special_tokens=skip_special_tokens)
    assert "".join(stream(detok, ids)) == ("Hi there 🎉" if skip_special_tokens else "Hi there 🎉<|im_end|>")


def test_stop_string_spanning_tokens(make: Detokenizer, tokenizer: PreTrainedTokenizerBase) -> None:
    text = "The cat sat on the mat. café 🎉 done"
    for stop, before in [("sat on", "The cat "), ("é 🎉", "The cat sat on the mat. caf")]:
        ids = encode(tokenizer, text)
        assert len(encode(tokenizer, stop)) >= 2
        for include in (False, True):
            detok = make(tokenizer, [], stop=[stop], include_stop_str_in_output=include)
            deltas = stream(detok, ids)
            assert detok.stop_reason == stop and detok.finished
            assert "".join(deltas) == detok.output_text == before + (stop if include else "")


def test_stop_string_across_prompt_boundary_does_not_match(
    make: Detokenizer, tokenizer: PreTrainedTokenizerBase
) -> None:
    ids = encode(tokenizer, "Hello world is big")
    cut = next(i for i in range(len(ids)) if tokenizer.decode(ids[:i]).endswith("wor"))
    detok = make(tokenizer, ids[:cut], stop=["world"])
    deltas = stream(detok, ids[cut:])
    assert detok.stop_reason is None and "".join(deltas) == detok.output_text == "ld is big"


def test_first_stop_string_to_complete_wins(make: Detokenizer, tokenizer: PreTrainedTokenizerBase) -> None:
    ids = encode(tokenizer, "The cat sat on the mat.")
    cases = [(["mat", "cat"], "cat", "The "), (["sat on the mat", "on"], "on", "The cat sat ")]
    for stop, stop_reason, text in cases:
        for chunk in (1, 2, len(ids)):  # the answer must not depend on how tokens are batched
            detok = make(tokenizer, [], stop=stop)
            assert "".join(stream(detok, ids, chunk)) == text and detok.stop_reason == stop_reason


def test_tail_held_back_until_finish(make: Detokenizer, tokenizer: PreTrainedTokenizerBase) -> None:
    ids = encode(tokenizer, "The cat sat on the mat.")
    detok = make(tokenizer, [], stop=["xyz", "q"])
    streamed = ""
    for token_id in ids:
        assert detok.update([token_id]) is None
        streamed += detok.get_delta()
        assert streamed == detok.output_text[:-2]  # len("xyz") - 1 characters held back
    detok.update([], finished=True)
    assert streamed + detok.get_delta() == "The cat sat on the mat."

    detok = make(tokenizer, [], stop=["xyz"], include_stop_str_in_output=True)
    detok.update(ids)
    assert detok.get_delta() == "The cat sat on the mat."  # nothing would be cut, so nothing is held


def test_prompt_tail_gives_sentencepiece_its_context(make: Detokenizer) -> None:
    """A Metaspace decoder drops a lone window's leading space; with the prompt in front it is kept (as in vLLM)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(["Hello world, the cat sat on the mat."], trainers.BpeTrainer(special_tokens=["<unk>"]))
    sp = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)
    ids = encode(sp, "Hello world, the cat")
    detok = make(sp, ids[:1])
    assert "".join(stream(detok, ids[1:])) == " world, the cat" != sp.decode(ids[1:])


def test_fast_tokenizers_take_the_rust_path(tokenizer: PreTrainedTokenizerBase) -> None:
    """The fast path is what runs for a fast tokenizer (and the equality tests above are about it)."""
    assert tokenizer.is_fast
    assert IncrementalDetokenizer(tokenizer, encode(tokenizer, "Say: "))._stream is not None
    assert IncrementalDetokenizer(tokenizer, encode(tokenizer, "Say: "), decode_stream=False)._stream is None


def test_update_after_finish_and_empty_stop_are_errors(make: Detokenizer, tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        make(tokenizer, [], stop=[""])
    detok = make(tokenizer, [], stop=["cat"])
    assert detok.update(encode(tokenizer, "The cat")) == "cat"
    with pytest.raises(RuntimeError):
        detok.update([5])
