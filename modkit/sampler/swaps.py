"""Swapping the sampler: its trial probe and its guard (the mechanism is ``modkit.guard``).

Both the sampler process (which owns which implementation runs) and each worker (which runs
it next to its logits) try a new sampler before it takes over, so the probe lives here, in
the sampler's own package, and neither imports the other's internals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modkit.guard import Guarded
from modkit.sampler.interface import Sampler, SamplerOutput, SamplingState
from modkit.sampling_params import SamplingParams


class GuardedSampler(Guarded[Sampler], Sampler):
    """A swapped-in sampler with the one it replaced as its fallback.

    It does not override ``can_sample_ahead``: a guarded sampler never samples ahead, since
    a swapped-in one may read anything.
    """

    def __init__(self, candidate: Sampler, fallback: Sampler) -> None:
        Guarded.__init__(self, candidate, fallback)
        Sampler.__init__(self, candidate.seed)

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
        vocab_size = logits.shape[1]  # logits: (N, V), one row per state
        return self.guarded("sample", lambda s: check_sampler_output(s.sample(logits, states), len(states), vocab_size))


def check_sampler_output(output: SamplerOutput, num_rows: int, vocab_size: int) -> SamplerOutput:
    """``output``, if it has one token id per row, each in the vocabulary; ValueError otherwise."""
    ids = output.sampled_token_ids
    if tuple(ids.shape) != (num_rows,):
        raise ValueError(f"sampled {tuple(ids.shape)} token ids for {num_rows} rows")
    if num_rows and not (int(ids.min()) >= 0 and int(ids.max()) < vocab_size):
        raise ValueError(f"sampled a token id outside the vocabulary [0, {vocab_size})")
    return output


@torch.inference_mode()
def try_sampler(sampler: Sampler, vocab_size: int, device: torch.device) -> None:
    """The trial: sample a probe batch; raises if the sampler fails or returns ids that cannot be tokens.

    Five rows, one for each kind of row a step may hold: greedy, seeded with top-k/top-p and
    logprobs, plain random, penalised greedy with ``min_tokens``, and ``min_p`` with a bias.
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(5, vocab_size, generator=generator) * 3).to(device)  # (5, V)
    prompt = [1, 2, 2, 3]
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=1, logprobs=2),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0, repetition_penalty=1.2, presence_penalty=0.5, min_tokens=2),
        SamplingParams(temperature=0.9, min_p=0.1, logit_bias={1: 2.0}),
    ]
    states = [SamplingState.create(p, prompt, device, eos_token_ids=(0,)) for p in params]
    check_sampler_output(sampler.sample(logits, states), len(states), vocab_size).to_lists()
