"""Incremental detokenization: a request's output text, grown a few tokens at a time.

Two obvious approaches are wrong. Decoding each new token on its own breaks characters:
byte-level BPE splits an emoji or a CJK character into several byte tokens, and one of
them alone decodes to the replacement character "\\ufffd". Decoding all output tokens
every step is right but costs O(n) per step, O(n^2) per request.

So, like Hugging Face TGI and vLLM, we decode a short window of tokens twice::

    token ids:  ... | prefix_offset ......... read_offset ....... end |
                      └─ already emitted ──┘ └─ new tokens ──┘
    prefix_text = decode(ids[prefix_offset:read_offset])
    new_text    = decode(ids[prefix_offset:])
    delta       = new_text[len(prefix_text):]

The already-emitted tokens in front give the decoder its context (a sentencepiece
decoder drops the leading space of a window's first token, so that token must not be
new). If ``new_text`` ends in "\\ufffd", the last character is still incomplete: emit
nothing and wait for more tokens. Otherwise emit the delta and slide the window forward.

For a fast tokenizer the same algorithm runs in Rust, in ``tokenizers``' ``DecodeStream``
(one call per token instead of two decodes; vLLM V1 does the same). The offsets here are
kept alongside for what it cannot do: a prompt that ends mid-character (the stream would
put that character's replacement into the output), a request that ends mid-character
(the stream has no flush), and a token id it refuses. The Python path below is the one to
read; the Rust one must give the same text, and ``tests/test_detokenizer.py`` runs both.

Stop strings are checked on the output text (never the prompt) as it grows; the search
covers only the new text plus ``len(stop) - 1`` characters before it, since a match lying
wholly in older text would have been found a step earlier.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Prompt tokens decoded as context in front of the first output token (vLLM uses 5 as well).
INITIAL_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """The output text of one request, with stop strings, for streaming and for the final result.

    Per step, the engine calls ``update(new_token_ids, finished)`` with the tokens just
    sampled (``finished=True`` when the request ends for another reason: EOS, max_tokens,
    abort). A returned stop string means the request finishes with finish_reason "stop"
    and stop_reason = that string. ``get_delta()`` then hands out the text to stream.

    Invariants:
      - ``output_text`` never ends in an incomplete character while the request runs.
      - Once finished, the deltas joined equal ``output_text``; with no stop string matched,
        that is ``tokenizer.decode(output_ids, skip_special_tokens=...)`` for byte-level BPE.
        (A sentencepiece decoder keeps the first output token's leading space here, since the
        prompt tail is decoded in front of it, as in vLLM.)
      - After a stop match, ``output_text`` ends just before the stop string (just after
        it with ``include_stop_str_in_output``), and no stop string ends earlier in it.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        decode_stream: bool = True,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
        self.tokenizer = tokenizer
        # The Rust tokenizer inside a transformers fast tokenizer, when there is one.
        self._rust = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output

        # The last few prompt tokens (context only, never in the output), then the output tokens.
        self._ids = list(prompt_token_ids[-INITIAL_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stream = self._open_stream() if decode_stream else None

        self.output_text = ""
        self.stop_reason: str | None = None  # the stop string that ended the request, if any
        self.finished = False
        # NOTE: a stop string may be completed by later tokens, so while the request runs the
        # last len(longest stop) - 1 characters are held back from get_delta() (as vLLM does):
        # a client must never see text that is then cut off. With include_stop_str_in_output
        # nothing is cut before a stop string's end, so nothing needs holding back.
        hold = max((len(s) for s in self.stop), default=1) - 1
        self._holdback = 0 if include_stop_str_in_output else hold
        self._num_sent = 0  # characters of output_text already returned by get_delta()

    def update(self, new_token_ids: Sequence[int], finished: bool = False) -> str | None:
        """Add sampled tokens; return the stop string that matched, if one did (the request is then finished).

        With ``finished=True`` the request ends here: characters still incomplete are
        decoded as ``decode`` would ("\\ufffd"), since no later token can complete them.
        """
        if self.finished:
            raise RuntimeError("update() after the request finished")
        new_text = ""
        for token_id in new_token_ids:
            self._ids.append(token_id)
            new_text += self._stream_next(token_id) if self._stream is not None else self._decode_next()
        if finished and self._read_offset < len(self._ids):
            new_text += self._decode_next(flush=True)
        self.output_text += new_text
        self.stop_reason = self._check_stop(len(new_text))
        self.finished = finished or self.stop_reason is not None
        return self.stop_reason

    def get_delta(self) -> str:
        """Text not yet returned, less the tail that could still start a stop string (all of it once finished)."""
        end = len(self.output_text) if self.finished else len(self.output_text) - self._holdback
        assert self._num_sent <= len(self.output_text), "a stop string cut text that was already sent"
        if end <= self._num_sent:
            return ""
        delta = self.output_text[self._num_sent : end]
        self._num_sent = end
        return delta

    def _decode(self, ids: list[int]) -> str:
        # NOTE: clean_up_tokenization_spaces rewrites " ." and " 's" by looking at neighbours,
        # which a window cannot reproduce; vLLM does not apply it when streaming either.
        if self._rust is not None:  # a fast tokenizer: skip the Python wrapper, twice per token
            return str(self._rust.decode(ids, skip_special_tokens=self.skip_special_tokens))
        text = self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )
        assert isinstance(text, str)
        return text

    def _decode_next(self, flush: bool = False) -> str:
        """The text the unread tokens add, or "" while they end mid-character (unless flushing)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        # Nothing new (say, a skipped special token) or an unfinished character: wait for more tokens.
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not flush):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def _open_stream(self) -> Any:
        """A ``DecodeStream`` primed with the prompt tail, or None where the Python path must run."""
        if self._rust is None:
            return None
        try:
            from tokenizers.decoders import DecodeStream
        except ImportError:  # tokenizers older than 0.21
            return None
        if self._decode(self._ids).endswith("\ufffd"):
            return None  # a prompt that ends mid-character: the stream would emit that character
        stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
        for token_id in self._ids:  # the prompt tail, as context
            stream.step(self._rust, token_id)
        return stream

    def _stream_next(self, token_id: int) -> str:
        """``_decode_next`` for one new token, in Rust; the offsets follow what it emitted."""
        assert self._stream is not None
        try:
            text = self._stream.step(self._rust, token_id)
        except Exception:  # an id the tokenizer refuses: the Python path decodes it as decode() would
            self._stream = None
            return self._decode_next()
        if not text:
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return str(text)

    def _check_stop(self, num_new_chars: int) -> str | None:
        """Find the stop string that completes first in the new text and truncate the output there.

        NOTE: vLLM takes the first stop string *in list order* that occurs. We take the one
        whose match ends first, as a reader going left to right would meet it; then the
        result does not depend on how many tokens arrived in one update.
        """
        if num_new_chars == 0 or not self.stop:
            return None
        text = self.output_text
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop_str in self.stop:
            start = text.find(stop_str, max(len(text) - num_new_chars - len(stop_str) + 1, 0))
            if start == -1:
                continue
            match = (start + len(stop_str), start, stop_str)
            if best is None or match < best:
                best = match
        if best is None:
            return None
        end, start, stop_str = best
        self.output_text = text[: end if self.include_stop_str_in_output else start]
        return stop_str
