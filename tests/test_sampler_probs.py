"""``DefaultSampler.probs``: the distribution ``sample`` draws from, checked against ``sample`` itself."""

from __future__ import annotations

from typing import Any

import torch

from modkit.sampler import DefaultSampler, SamplingState
from modkit.sampler.topk_topp import apply_min_p, apply_top_k, apply_top_p
from modkit.sampling_params import SamplingParams

CPU = torch.device("cpu")
V = 12


def state(prompt: list[int] | None = None, output: list[int] | None = None, **params: Any) -> SamplingState:
    s = SamplingState.create(SamplingParams(**params), prompt or [1, 2, 3], CPU, eos_token_ids=(0,))
    s.output_token_ids = list(output or [])
    return s


def logits_row() -> torch.Tensor:
    return torch.linspace(2.0, -2.0, V).roll(3)  # (V,) most likely token is id 3, not 0


def test_temperature_alone_is_softmax_of_logits_over_t() -> None:
    logits = logits_row().repeat(3, 1)
    probs = DefaultSampler().probs(logits, [state(temperature=t) for t in (0.5, 1.0, 2.0)])
    for row, t in zip(probs, (0.5, 1.0, 2.0), strict=True):
        torch.testing.assert_close(row, (logits[0] / t).softmax(-1))


def test_masks_are_the_masks_functions_then_softmax() -> None:
    logits = logits_row().unsqueeze(0)
    sampler = DefaultSampler()
    cases = {
        "top_k": (dict(temperature=0.7, top_k=3), apply_top_k(logits / 0.7, torch.tensor([3]), 3)),
        "top_p": (dict(temperature=0.7, top_p=0.5), apply_top_p(logits / 0.7, torch.tensor([0.5]))),
        "min_p": (dict(temperature=0.7, min_p=0.3), apply_min_p(logits / 0.7, torch.tensor([0.3]))),
    }
    for name, (params, masked) in cases.items():
        probs = sampler.probs(logits, [state(**params)])[0]
        torch.testing.assert_close(probs, masked.softmax(-1)[0], msg=name)
        assert (probs > 0).sum() < V, f"{name} dropped something"


def test_greedy_is_one_hot_on_the_penalised_argmax() -> None:
    logits = logits_row().unsqueeze(0)
    plain = DefaultSampler().probs(logits, [state(temperature=0)])[0]
    assert plain.tolist() == [1.0 if v == 3 else 0.0 for v in range(V)]
    # Token 3 already said three times: a frequency penalty moves the argmax, as in ``sample``.
    penalised = state(temperature=0, output=[3, 3, 3], frequency_penalty=2.0)
    probs = DefaultSampler().probs(logits, [penalised])[0]
    assert int(probs.argmax()) != 3 and probs.max() == 1.0
    assert int(probs.argmax()) == int(DefaultSampler().sample(logits, [penalised]).sampled_token_ids[0])


def test_sample_draws_with_these_probs() -> None:
    """Many seeded rows, one per seed, with mixed parameters: frequencies match ``probs`` closely."""
    draws = 4000
    logits = logits_row().repeat(draws, 1)
    param_sets = [dict(temperature=1.3), dict(temperature=0.8, top_k=4, top_p=0.9), dict(temperature=1.0, min_p=0.2)]
    sampler = DefaultSampler()
    for params in param_sets:
        states = [state(seed=seed, output=[3], presence_penalty=0.5, **params) for seed in range(draws)]
        probs = sampler.probs(logits[:1], states[:1])[0]
        sampled = sampler.sample(logits, states).sampled_token_ids
        freq = torch.bincount(sampled, minlength=V).double() / draws
        assert (freq[probs == 0] == 0).all(), f"{params}: a token of probability 0 was drawn"
        tv = 0.5 * float((freq - probs.double()).abs().sum())
        # Bretagnolle-Huber-Carol: P(TV >= eps) <= 2^V exp(-2 N eps^2); 0.06 puts that below 1e-9.
        assert tv < 0.06, f"{params}: total variation {tv:.3f}"


def test_probs_leaves_inputs_and_generators_alone() -> None:
    logits = logits_row().unsqueeze(0)
    before = logits.clone()
    s = state(temperature=1.0, seed=7)
    assert s.generator is not None
    generator_state = s.generator.get_state()
    DefaultSampler().probs(logits, [s])
    assert torch.equal(logits, before) and torch.equal(s.generator.get_state(), generator_state)
