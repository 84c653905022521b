"""``SamplingMetadata``: one step's per-request parameters, gathered into tensors on the device.

This is the only place the sampler loops over requests in Python: once per step, to read
each row's ``SamplingParams`` into small lists, which become a handful of tensors (and, for
rows with structured outputs, to step their grammar matchers: ``grammar.py``). All work
over the vocabulary happens afterwards, batched. Optional parts are None when no row of the
step uses them, so a batch of plain greedy requests pays for nothing it does not use.

NOTE: vLLM keeps these tensors in a persistent batch and updates only the rows that changed,
and keeps output tokens on the device. Here they are rebuilt from the states each step,
which costs Python time proportional to the batch (and, for rows with penalties, to their
token counts) but keeps the sampler stateless apart from its generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modkit.sampler.grammar import GrammarMask, states_grammar_mask
from modkit.sampler.interface import SamplingState
from modkit.sampling_params import SamplingParams, SamplingType
from modkit.transfer import to_device


@dataclass(slots=True)
class TokenEdits:
    """A sparse set of (row, token) entries of the logits, with a value for each when one is needed."""

    rows: torch.Tensor  # (E,) int64
    token_ids: torch.Tensor  # (E,) int64
    values: torch.Tensor | None  # (E,) float32, or None when every entry is set to the same value


@dataclass(slots=True)
class PenaltyTensors:
    """Inputs of ``apply_penalties``; rows without penalties have neutral values and no tokens."""

    prompt_token_ids: torch.Tensor  # (N, Lp) int64, padded with V
    output_token_ids: torch.Tensor  # (N, Lo) int64, padded with V
    presence: torch.Tensor  # (N,) float32
    frequency: torch.Tensor  # (N,) float32
    repetition: torch.Tensor  # (N,) float32


@dataclass(slots=True)
class SamplingMetadata:
    """Per-step sampling parameters of a batch, as tensors on the logits' device (vLLM's name)."""

    all_greedy: bool
    all_random: bool
    is_greedy: torch.Tensor  # (N,) bool
    temperature: torch.Tensor  # (N,) float32, 1.0 on greedy rows so that dividing by it is harmless
    min_p: torch.Tensor | None  # (N,) float32, 0 = off
    top_k: torch.Tensor | None  # (N,) int64, 0 = off
    max_top_k: int  # largest top_k in use, for torch.topk
    top_p: torch.Tensor | None  # (N,) float32, 1 = off
    generators: dict[int, torch.Generator]  # row -> its own generator, for seeded random rows
    grammar: GrammarMask | None  # tokens each constrained row's grammar allows next (structured outputs)
    logit_bias: TokenEdits | None  # added to the logits
    min_tokens_mask: TokenEdits | None  # set to -inf: eos and stop ids of rows short of min_tokens
    penalties: PenaltyTensors | None
    max_num_logprobs: int | None  # largest ``logprobs`` asked for; None if no row asked
    num_logprobs: list[int | None]  # per row, for trimming on the host

    @classmethod
    def from_states(cls, states: Sequence[SamplingState], vocab_size: int, device: torch.device) -> SamplingMetadata:
        """Read every row's parameters; the only per-request Python loop of a step."""
        rows: list[RowParams] = []
        generators: dict[int, torch.Generator] = {}
        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias_values: list[float] = []
        mask_rows: list[int] = []
        mask_ids: list[int] = []
        for row, state in enumerate(states):
            params = state.params
            values = state.row
            if values is None:  # the request's first step: its parameters, read once
                values = state.row = RowParams.of(params, vocab_size)
            rows.append(values)
            if not values.special:
                continue
            if not values.greedy and state.generator is not None:
                generators[row] = state.generator
            if params.logit_bias:
                params.check_token_ids(vocab_size)
                bias_rows += [row] * len(params.logit_bias)
                bias_ids += params.logit_bias.keys()
                bias_values += params.logit_bias.values()
            if masked := state.min_tokens_masked_ids:
                params.check_token_ids(vocab_size)
                mask_rows += [row] * len(masked)
                mask_ids += masked
        greedy = [r.greedy for r in rows]
        temperature = [r.temperature for r in rows]
        min_p = [r.min_p for r in rows]
        top_k = [r.top_k for r in rows]
        top_p = [r.top_p for r in rows]

        # Through pinned memory: on a GPU the forward of this step may still be running.
        def ints(values: list[int]) -> torch.Tensor:
            return to_device(values, torch.int64, device)

        def floats(values: list[float]) -> torch.Tensor:
            return to_device(values, torch.float32, device)

        logprobs = [s.params.logprobs for s in states]
        return cls(
            all_greedy=all(greedy),
            all_random=not any(greedy),
            is_greedy=to_device(greedy, torch.bool, device),
            temperature=floats(temperature),
            min_p=floats(min_p) if any(min_p) else None,
            top_k=ints(top_k) if any(top_k) else None,
            max_top_k=max(top_k, default=0),
            top_p=floats(top_p) if any(p < 1 for p in top_p) else None,
            generators=generators,
            grammar=states_grammar_mask(states, vocab_size, device),
            logit_bias=TokenEdits(ints(bias_rows), ints(bias_ids), floats(bias_values)) if bias_rows else None,
            min_tokens_mask=TokenEdits(ints(mask_rows), ints(mask_ids), None) if mask_rows else None,
            penalties=_penalty_tensors(states, vocab_size, device) if any(r.penalised for r in rows) else None,
            max_num_logprobs=max((k for k in logprobs if k is not None), default=None),
            num_logprobs=logprobs,
        )


@dataclass(frozen=True, slots=True)
class RowParams:
    """What a row's ``SamplingParams`` contribute to the step's tensors."""

    greedy: bool
    temperature: float  # 1.0 on greedy rows, so that dividing by it is harmless
    min_p: float
    top_k: int  # 0 = off
    top_p: float
    special: bool  # a seed, a logit bias or min_tokens: the row needs a look of its own
    penalised: bool  # a presence, frequency or repetition penalty

    @classmethod
    def of(cls, params: SamplingParams, vocab_size: int) -> RowParams:
        greedy = params.sampling_type == SamplingType.GREEDY
        # Greedy rows ignore temperature and the truncation masks, as vLLM does.
        return cls(
            greedy=greedy,
            temperature=1.0 if greedy else params.temperature,
            min_p=0.0 if greedy else params.min_p,
            top_k=0 if greedy or params.top_k >= vocab_size else params.top_k,  # k >= V keeps everything
            top_p=1.0 if greedy else params.top_p,
            special=params.seed is not None or bool(params.logit_bias) or params.min_tokens > 0,
            penalised=bool(params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0),
        )


def _penalty_tensors(states: Sequence[SamplingState], vocab_size: int, device: torch.device) -> PenaltyTensors | None:
    """Padded token lists and penalty values, or None when no row has a penalty."""
    presence = [s.params.presence_penalty for s in states]
    frequency = [s.params.frequency_penalty for s in states]
    repetition = [s.params.repetition_penalty for s in states]
    if not any(presence) and not any(frequency) and all(r == 1.0 for r in repetition):
        return None
    # Only rows that use a penalty contribute tokens; the prompt matters to repetition only.
    outputs = [
        s.output_token_ids if (p or f or r != 1.0) else []
        for s, p, f, r in zip(states, presence, frequency, repetition, strict=True)
    ]
    prompts = [s.prompt_token_ids if r != 1.0 else [] for s, r in zip(states, repetition, strict=True)]

    def padded(rows: list[list[int]]) -> torch.Tensor:
        width = max(map(len, rows))
        return to_device([ids + [vocab_size] * (width - len(ids)) for ids in rows], torch.int64, device)

    def values(xs: list[float]) -> torch.Tensor:
        return to_device(xs, torch.float32, device)

    return PenaltyTensors(padded(prompts), padded(outputs), values(presence), values(frequency), values(repetition))
