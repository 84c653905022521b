"""The tiny model's tokenizer: byte-level BPE trained on the corpus, with Qwen2's pre-tokenizer."""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from modkit.tiny.chat import END_OF_TEXT, IM_END, IM_START

SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END]  # ids 0, 1, 2: the trainer puts them first
# The Jinja form of ``modkit.tiny.chat.render_chat``: the same text, written by the tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen2's pre-tokenizer: words with their leading space, single digits, punctuation runs.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE on ``docs``; every byte is in the alphabet, so nothing is unknown.

    NOTE: the normalizer and pre-tokenizer are exactly Qwen2's, because transformers 5
    loads any ``qwen2`` folder with ``Qwen2Tokenizer``, which rebuilds them from its own
    code whatever tokenizer.json says; transformers 4 uses tokenizer.json as written.
    Matching them makes both give the ids the model was trained on.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    return tok


def encode_stream(tok: Tokenizer, docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """All documents as one token stream, each followed by ``<|endoftext|>``.

    Returns ``(tokens, starts)``: the stream and the offset where each document begins.
    """
    eot = SPECIAL_TOKENS.index(END_OF_TEXT)  # train_tokenizer checked the ids
    ids: list[int] = []
    starts: list[int] = []
    for enc in tok.encode_batch(docs):
        starts.append(len(ids))
        ids += [*enc.ids, eot]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(starts, dtype=torch.long)
