"""The default sampler: vLLM V1's pipeline, batched over requests with mixed parameters.

One step, for logits (N, V) and N sampling states::

    raw logits ──► log_softmax ──────────────────────────────────────────► logprobs (rows that asked)
        │
        ▼  logits processors: they can move the argmax, so greedy rows get them too
    grammar mask ──► + logit_bias ──► min_tokens mask ──► penalties
        │
        ├──► greedy rows: argmax
        ▼
    / temperature ──► min_p ──► top_k ──► top_p ──► softmax ──► exponential race ──► random rows

Everything runs on the logits' device with one op per stage for the whole batch; rows whose
parameter is off pass through a stage unchanged. The only Python loop over requests builds
the step's ``SamplingMetadata``, plus one noise draw per seeded row and, for rows with
structured outputs, one grammar matcher step each (``grammar.py``).

Each stage is a method, so a sampler swapped in (``Pipeline.swap("sampler", ...)``) can
replace one stage and inherit the others: ``apply_structured_outputs`` for the grammar mask.

``DefaultSampler.probs`` runs the same stages and stops before the race: it returns the
distribution each row's token is drawn from, for a notebook to plot or a test to check.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modkit.sampler.grammar import GrammarMask, apply_grammar_mask
from modkit.sampler.interface import LogprobsTensors, Sampler, SamplerOutput, SamplingState, register_sampler
from modkit.sampler.metadata import SamplingMetadata
from modkit.sampler.penalties import apply_penalties
from modkit.sampler.topk_topp import apply_min_p, apply_top_k, apply_top_p, random_sample


@register_sampler("default")
class DefaultSampler(Sampler):
    """Batched sampling with vLLM V1's semantics and order of operations."""

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(seed)
        # One generator per device, for rows without a seed of their own.
        self._shared_generators: dict[torch.device, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(states), "one row of logits per sampling state"
        if not states:
            return SamplerOutput(torch.empty(0, dtype=torch.int64, device=logits.device), None, [])
        metadata = SamplingMetadata.from_states(states, logits.shape[1], logits.device)

        # Logprobs describe the model's own distribution (vLLM's default "raw_logprobs"),
        # so they are taken before any processing.
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)  # (N, V)

        processed = self.apply_logits_processors(logits.to(torch.float32, copy=True), metadata)
        sampled = self.sample_tokens(processed, metadata)  # (N,) int64

        logprobs = None
        if raw_logprobs is not None:
            assert metadata.max_num_logprobs is not None
            logprobs = gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled, logprobs, metadata.num_logprobs)

    def can_sample_ahead(self, states: Sequence[SamplingState]) -> bool:
        """Only penalties and ``min_tokens`` read the output tokens here."""
        return not any(s.reads_output_tokens for s in states)

    def apply_logits_processors(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """The grammar mask, logit_bias, the min_tokens mask, penalties. May modify ``logits`` (N, V) in place."""
        if (grammar := metadata.grammar) is not None:
            logits = self.apply_structured_outputs(logits, grammar)
        if (bias := metadata.logit_bias) is not None:
            assert bias.values is not None
            logits.index_put_((bias.rows, bias.token_ids), bias.values, accumulate=True)
        if (mask := metadata.min_tokens_mask) is not None:
            logits.index_put_((mask.rows, mask.token_ids), torch.tensor(float("-inf"), device=logits.device))
        if (p := metadata.penalties) is not None:
            logits = apply_penalties(
                logits, p.prompt_token_ids, p.output_token_ids, p.presence, p.frequency, p.repetition
            )
        return logits

    def apply_structured_outputs(self, logits: torch.Tensor, grammar: GrammarMask) -> torch.Tensor:
        """Structured outputs: -inf on every token a constrained row's grammar does not allow next."""
        apply_grammar_mask(logits, grammar)
        return logits

    def sample_tokens(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Argmax for greedy rows; temperature, truncation masks and a random draw for the others."""
        greedy = None if metadata.all_random else logits.argmax(dim=-1)  # (N,)
        if metadata.all_greedy:
            assert greedy is not None
            return greedy

        probs = random_probs(logits, metadata)  # (N, V)
        drawn = random_sample(probs, metadata.generators, self._shared_generator(logits.device))
        return drawn if greedy is None else torch.where(metadata.is_greedy, greedy, drawn)

    def probs(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """The distribution ``sample`` draws each row's next token from, without drawing; (N, V) float32.

        Every stage but the draw: logit processors, then for a random row temperature, the
        ``min_p``, ``top_k`` and ``top_p`` masks and softmax (``random_probs``); a greedy row gets
        a one-hot on its argmax. So ``sample`` picks token v for row i with probability
        ``probs[i, v]``, and a token with probability 0 never. Reads ``states`` as ``sample`` does,
        and advances no generator. For notebooks and tests that want to see the distribution.
        """
        assert logits.dim() == 2 and logits.shape[0] == len(states), "one row of logits per sampling state"
        metadata = SamplingMetadata.from_states(states, logits.shape[1], logits.device)
        processed = self.apply_logits_processors(logits.to(torch.float32, copy=True), metadata)
        probs = random_probs(processed, metadata)  # (N, V)
        one_hot = torch.zeros_like(probs).scatter_(1, processed.argmax(dim=-1, keepdim=True), 1.0)
        return torch.where(metadata.is_greedy.unsqueeze(1), one_hot, probs)

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._shared_generators:
            generator = torch.Generator(device=device)
            if self.seed is None:
                generator.seed()  # non-deterministic: from the OS
            else:
                generator.manual_seed(self.seed)
            self._shared_generators[device] = generator
        return self._shared_generators[device]


def random_probs(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """What random rows draw from: ``logits`` (N, V) / temperature, then the min_p, top_k and top_p
    masks (vLLM's order), then softmax; (N, V). Greedy rows come out too (at temperature 1) but
    are not meant to be read: they take the argmax."""
    logits = logits / metadata.temperature.unsqueeze(1)
    if metadata.min_p is not None:
        logits = apply_min_p(logits, metadata.min_p)
    if metadata.top_k is not None:
        logits = apply_top_k(logits, metadata.top_k, metadata.max_top_k)
    if metadata.top_p is not None:
        logits = apply_top_p(logits, metadata.top_p)
    return logits.softmax(dim=-1)


def gather_logprobs(logprobs: torch.Tensor, sampled: torch.Tensor, num_top: int) -> LogprobsTensors:
    """The sampled token's logprob and rank, and the ``num_top`` best tokens, of ``logprobs`` (N, V)."""
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)  # (N, K) each, most likely first
    sampled_logprob = logprobs.gather(1, sampled.unsqueeze(1))  # (N, 1)
    # Rank 1 is the most likely token; tokens tied with the sampled one count as ranked above it.
    ranks = (logprobs >= sampled_logprob).sum(dim=-1)  # (N,)
    return LogprobsTensors(
        logprob_token_ids=torch.cat([sampled.unsqueeze(1), top_ids], dim=1),  # (N, 1 + K)
        logprobs=torch.cat([sampled_logprob, top_logprobs], dim=1),  # (N, 1 + K)
        selected_token_ranks=ranks,
    )
