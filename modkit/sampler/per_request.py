"""A sampler variant that samples one request at a time: the default sampler's stages on batches of one.

Same semantics as ``default`` (greedy rows and seeded rows draw the very same tokens), so
swapping it in changes nothing but the cost: each stage runs once per request instead of
once per step. It is what batching the sampler buys, made measurable: swap it in and watch
``sample_s`` in the trace's steps grow with the batch.

Logprobs do not depend on how a token was drawn, so they are still gathered once for the
whole step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modkit.sampler.interface import SamplerOutput, SamplingState, register_sampler
from modkit.sampler.metadata import SamplingMetadata
from modkit.sampler.sampler import DefaultSampler, gather_logprobs


@register_sampler("per_request")
class PerRequestSampler(DefaultSampler):
    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(states), "one row of logits per sampling state"
        vocab_size, device = logits.shape[1], logits.device
        sampled = torch.empty(len(states), dtype=torch.int64, device=device)
        for i, state in enumerate(states):
            row = SamplingMetadata.from_states([state], vocab_size, device)
            processed = self.apply_logits_processors(logits[i : i + 1].to(torch.float32, copy=True), row)
            sampled[i : i + 1] = self.sample_tokens(processed, row)
        num_logprobs = [s.params.logprobs for s in states]
        asked = [k for k in num_logprobs if k is not None]
        logprobs = None
        if asked:
            logprobs = gather_logprobs(logits.log_softmax(dim=-1, dtype=torch.float32), sampled, max(asked))
        return SamplerOutput(sampled, logprobs, num_logprobs)
