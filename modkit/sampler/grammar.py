"""Structured outputs: the sampler stage that keeps a request's output inside a grammar.

A request whose ``SamplingParams.structured_outputs`` is set gets a ``RequestGrammar`` when
the engine creates its ``SamplingState``: an xgrammar matcher over the grammar, compiled
for the model's vocabulary by a ``GrammarBackend`` (once per distinct grammar: the
compiler caches). Each step, the sampler's first stage::

    output_token_ids ──► matcher.accept_token   (the tokens it has not accepted yet)
                         matcher.fill_next_token_bitmask ──► bitmask (N, ceil(V / 32)) int32
    logits ──► every token the bitmask leaves out set to -inf ──► logit_bias, penalties, ...

The bitmask holds one bit per token (1 = allowed); rows without a grammar are left alone.
When the grammar is complete the matcher allows only its stop tokens (the model's eos ids),
so the request ends on eos as any other does, with ``finish_reason="stop"``.

The matcher follows the output tokens, so a constrained row reads the last step's token:
like a penalised row it cannot be sampled ahead (``SamplingState.reads_output_tokens``).

vLLM does the same with the same library (its ``xgrammar`` structured-output backend), but
compiles in a thread pool and fills the bitmask in the scheduler's process; here both
happen in the process that samples, when the request is first scheduled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from modkit.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerBase

    from modkit.sampler.interface import SamplingState

log = logging.getLogger(__name__)

# At most this many whitespace characters in a row between JSON tokens. vLLM allows any
# number; a small model then often emits newlines until max_tokens, and the JSON never closes.
# Sixteen still fits JSON indented by two spaces, seven levels deep.
MAX_JSON_WHITESPACE = 16


class RequestGrammar:
    """One request's place in its grammar: an xgrammar matcher and how many output tokens it has accepted."""

    def __init__(self, matcher: xgr.GrammarMatcher, stop_token_ids: Sequence[int]) -> None:
        self.matcher = matcher
        self.stop_token_ids = list(stop_token_ids)
        self.num_accepted = 0  # output tokens the matcher has seen
        self.broken = False  # a token the grammar refused was accepted (a sampler that skipped the mask)

    def advance(self, output_token_ids: Sequence[int]) -> None:
        """Feed the matcher the output tokens it has not seen. After the grammar is complete
        (``ignore_eos`` keeps the request going) the eos tokens that follow are not fed."""
        assert len(output_token_ids) >= self.num_accepted, "output tokens only grow"
        for token_id in output_token_ids[self.num_accepted :]:
            if not self.broken and not self.matcher.is_terminated() and not self.matcher.accept_token(token_id):
                log.warning("token %d is outside the grammar: the request is no longer constrained", token_id)
                self.broken = True
        self.num_accepted = len(output_token_ids)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write into ``bitmask[row]`` the tokens the grammar allows next (all, if it is broken)."""
        if self.broken:
            bitmask[row] = -1  # every bit set
        elif self.matcher.is_terminated():  # complete, and eos accepted: only eos again
            bitmask[row] = stop_only_bitmask(self.stop_token_ids, bitmask.shape[1])
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)

    @property
    def is_terminated(self) -> bool:
        """Whether the grammar is complete and a stop token has been accepted."""
        return self.matcher.is_terminated()


class GrammarBackend:
    """Compiles ``StructuredOutputsParams`` for one model's vocabulary (xgrammar's ``GrammarCompiler``).

    The tokenizer is loaded on the first grammar, so an engine that never sees one never pays
    for it. ``vocab_size`` is the model's (the logits' width), which may exceed the
    tokenizer's; ``stop_token_ids`` are the ids that may end a complete output.
    """

    def __init__(
        self,
        load_tokenizer: Callable[[], PreTrainedTokenizerBase],
        vocab_size: int,
        stop_token_ids: Sequence[int],
    ) -> None:
        self.load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None

    def grammar(self, params: StructuredOutputsParams) -> RequestGrammar:
        """A fresh matcher at the start of the grammar ``params`` describe."""
        import xgrammar as xgr

        return RequestGrammar(xgr.GrammarMatcher(self.compile(params)), self.stop_token_ids)

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """The grammar, compiled for the vocabulary (cached by xgrammar: a repeated schema costs a lookup)."""
        compiler = self.compiler()
        if params.json is not None or params.json_object:
            schema = params.source if params.json is not None else '{"type": "object"}'
            if params.disable_any_whitespace:  # compact, as vLLM's disable_any_whitespace
                return compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
            return compiler.compile_json_schema(schema, any_whitespace=True, max_whitespace_cnt=MAX_JSON_WHITESPACE)
        if params.regex is not None:
            return compiler.compile_regex(params.regex)
        if params.choice is not None:
            return compiler.compile_grammar(choice_grammar(params.choice))
        assert params.grammar is not None
        return compiler.compile_grammar(params.grammar)

    def compiler(self) -> xgr.GrammarCompiler:
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(
                self.load_tokenizer(), vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
            )
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler


def stop_only_bitmask(token_ids: Sequence[int], width: int) -> torch.Tensor:
    """A bitmask row (width,) int32 that allows only ``token_ids``."""
    words = [0] * width
    for token_id in token_ids:
        words[token_id // 32] |= 1 << (token_id % 32)
    # Each word as the int32 with the same 32 bits.
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose sentences are exactly ``choices``: ``root ::= "a" | "b"``."""
    # JSON's string escapes (\\", \\\\, \\n, \\uXXXX) are also EBNF's.
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


@dataclass(slots=True)
class GrammarMask:
    """A step's grammar bitmask, for the rows that have a grammar."""

    bitmask: torch.Tensor  # (N, ceil(V / 32)) int32, on the logits' device; bit v of a row: token v allowed
    rows: list[int]  # the constrained rows; the others' bits are never read


def grammar_mask(
    grammars: Sequence[RequestGrammar],
    output_token_ids: Sequence[Sequence[int]],
    rows: list[int],
    num_rows: int,
    vocab_size: int,
    device: torch.device,
) -> GrammarMask:
    """Advance each constrained row's matcher to its output tokens and fill the step's bitmask."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(num_rows, vocab_size)  # (N, ceil(V / 32)), every bit set
    for grammar, outputs, row in zip(grammars, output_token_ids, rows, strict=True):
        grammar.advance(outputs)
        grammar.fill_bitmask(bitmask, row)
    if device.type == "cuda":
        bitmask = bitmask.pin_memory().to(device, non_blocking=True)
    return GrammarMask(bitmask, rows)


def states_grammar_mask(states: Sequence[SamplingState], vocab_size: int, device: torch.device) -> GrammarMask | None:
    """``grammar_mask`` for the constrained rows among ``states``; None if there is none."""
    rows = [row for row, state in enumerate(states) if state.grammar is not None]
    if not rows:
        return None
    grammars = [g for g in (states[r].grammar for r in rows) if g is not None]
    return grammar_mask(grammars, [states[r].output_token_ids for r in rows], rows, len(states), vocab_size, device)


def apply_grammar_mask(logits: torch.Tensor, mask: GrammarMask) -> None:
    """Set to -inf, in place, every logit (N, V) of a constrained row that its grammar does not allow."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, mask.bitmask, vocab_size=logits.shape[1], indices=mask.rows)
