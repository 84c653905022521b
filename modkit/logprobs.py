"""The logprobs of one sampled token (or prompt token), as every component after the sampler sees them.

The sampler makes them (``modkit.sampler``), the scheduler hands them on in each step's
outputs (``modkit.scheduler.output``), and the frontend turns them into OpenAI's
``logprobs``. They live here, in no component, so that none of those imports another's
internals for them (vLLM keeps its ``Logprob`` in ``vllm/logprobs.py`` for the same reason).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TokenLogprobs:
    """Logprobs of one sampled token, on the host."""

    logprob: float  # of the sampled token
    rank: int  # 1 = the most likely token; tokens tied with it share the worse rank
    top_token_ids: list[int]  # the request's ``logprobs`` most likely tokens, most likely first
    top_logprobs: list[float]


@dataclass(slots=True)
class PromptLogprobs:
    """Logprobs of some of a request's prompt tokens, computed in one step (``prompt_logprobs``).

    ``logprobs[i]`` is that of prompt token ``start + i`` given the tokens before it. The first
    prompt token has none (``start`` >= 1); a long prompt's come in pieces, one per prompt chunk.
    """

    start: int
    logprobs: list[TokenLogprobs]
