"""The default sampler: masks, penalties, distributions, seeds and logprobs, alone and in mixed batches."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from modkit.sampler import (
    DefaultSampler,
    SampledToken,
    Sampler,
    SamplingMetadata,
    SamplingState,
    get_sampler,
    register_sampler,
    samplers,
)
from modkit.sampler.penalties import apply_penalties
from modkit.sampler.topk_topp import apply_min_p, apply_top_k, apply_top_p
from modkit.sampling_params import SamplingParams, SamplingParamsError

CPU = torch.device("cpu")
EOS = 0


def make_state(prompt: list[int] | None = None, eos: tuple[int, ...] = (EOS,), **params: Any) -> SamplingState:
    return SamplingState.create(SamplingParams(**params), prompt or [1, 2, 3], CPU, eos_token_ids=eos)


def kept(logits: torch.Tensor) -> list[set[int]]:
    """The token ids each row still allows."""
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of Pearson's chi-square test of ``counts`` against ``probs`` (categories with p > 0)."""
    expected = probs * counts.sum()
    statistic = ((counts - expected) ** 2 / expected).sum()
    chi2 = torch.distributions.Chi2(torch.tensor(float(len(probs) - 1), dtype=torch.float64))
    return 1.0 - float(chi2.cdf(statistic.double()))


# -- masks, on hand-made logits ------------------------------------------------------------------------------------


def test_top_k_keeps_ties_with_the_kth() -> None:
    row = torch.tensor([5.0, 3.0, 3.0, 1.0, 0.0])
    logits = row.repeat(5, 1)
    top_k = torch.tensor([1, 2, 4, 0, 9])  # 0 and >= V are off
    out = apply_top_k(logits, top_k, max_top_k=4)
    assert kept(out) == [{0}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1, 2, 3, 4}, {0, 1, 2, 3, 4}]
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)]), "survivors keep their logits"


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # Probabilities 0.1, 0.5, 0.15, 0.25 (vocabulary order differs from rank order on purpose).
    logits = torch.tensor([0.1, 0.5, 0.15, 0.25]).log().repeat(6, 1)
    top_p = torch.tensor([0.01, 0.45, 0.7, 0.8, 0.95, 1.0])
    out = apply_top_p(logits, top_p)
    assert kept(out) == [{1}, {1}, {1, 3}, {1, 3, 2}, {0, 1, 2, 3}, {0, 1, 2, 3}]
    assert torch.equal(out[5], logits[5])


def test_top_p_off_never_drops_a_tail_token() -> None:
    # Many tiny probabilities: their cumulative sum in float32 may round past 1.
    logits = torch.cat([torch.tensor([20.0]), torch.zeros(50_000)]).unsqueeze(0)
    out = apply_top_p(logits, torch.tensor([1.0]))
    assert torch.equal(out, logits)


def test_min_p_scales_with_the_top_probability() -> None:
    logits = torch.tensor([0.5, 0.25, 0.15, 0.1]).log().repeat(4, 1)
    out = apply_min_p(logits, torch.tensor([0.4, 0.25, 0.0, 1.0]))  # thresholds 0.2, 0.125, 0, 0.5
    assert kept(out) == [{0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0}]


# -- greedy and random sampling ------------------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    # Greedy ignores top_k / top_p / seed.
    states = [make_state(temperature=0.0, top_k=5 if i % 2 else 0, top_p=0.5, seed=i) for i in range(8)]
    out = DefaultSampler(seed=0).sample(logits, states)
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None


def test_temperature_sampling_matches_its_distribution() -> None:
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3])
    num_draws, temperature = 20_000, 0.7
    states = [make_state(temperature=temperature) for _ in range(num_draws)]
    drawn = DefaultSampler(seed=1234).sample(logits.repeat(num_draws, 1), states).sampled_token_ids
    counts = torch.bincount(drawn, minlength=5).double()
    probs = (logits / temperature).softmax(-1).double()
    assert chi_square_p_value(counts, probs) > 1e-3
    # The test can tell temperatures apart: the same counts against temperature 1 fail it.
    assert chi_square_p_value(counts, logits.softmax(-1).double()) < 1e-3


def test_seeded_rows_match_the_distribution_too() -> None:
    """Each row draws from its own generator: seeds 0..N-1, one draw each, still distributed right."""
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3])
    num_draws = 20_000
    states = [make_state(temperature=1.3, seed=s) for s in range(num_draws)]
    drawn = DefaultSampler(seed=0).sample(logits.repeat(num_draws, 1), states).sampled_token_ids
    counts = torch.bincount(drawn, minlength=5).double()
    assert chi_square_p_value(counts, (logits / 1.3).softmax(-1).double()) > 1e-3


def test_top_k_top_p_renormalise_what_they_keep() -> None:
    # Probabilities 0.4, 0.3, 0.2, 0.1: top_k=3 keeps 4/9, 3/9, 2/9; top_p=0.7 of that keeps 4/7, 3/7.
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    num_draws = 20_000
    states = [make_state(top_k=3, top_p=0.7) for _ in range(num_draws)]
    drawn = DefaultSampler(seed=7).sample(logits.repeat(num_draws, 1), states).sampled_token_ids
    counts = torch.bincount(drawn, minlength=4).double()
    assert counts[2] == 0 and counts[3] == 0
    assert chi_square_p_value(counts[:2], torch.tensor([4 / 7, 3 / 7], dtype=torch.float64)) > 1e-3


def test_top_p_applies_after_temperature() -> None:
    # Probabilities 0.4, 0.3, 0.2, 0.1. At temperature 1, top_p=0.5 keeps {0, 1}; at 0.5 the
    # distribution is 0.16 : 0.09 : 0.04 : 0.01 and token 0 alone holds 0.55 >= 0.5.
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().repeat(2000, 1)
    sampler = DefaultSampler(seed=0)
    sharp = sampler.sample(logits, [make_state(temperature=0.5, top_p=0.5) for _ in range(2000)])
    assert set(sharp.sampled_token_ids.tolist()) == {0}
    plain = sampler.sample(logits, [make_state(temperature=1.0, top_p=0.5) for _ in range(2000)])
    assert set(plain.sampled_token_ids.tolist()) == {0, 1}


def step_logits(step: int, vocab_size: int = 64) -> torch.Tensor:
    """Fixed, fairly flat logits for one step of one request (so random draws vary)."""
    return torch.randn(vocab_size, generator=torch.Generator().manual_seed(1000 + step))


def run_steps(sampler: Sampler, target: SamplingState, others: list[SamplingState], num_steps: int) -> list[int]:
    """Sample ``num_steps`` tokens for ``target``, placed at a different row every step among ``others``."""
    for step in range(num_steps):
        rows = list(others)
        position = step % (len(others) + 1)
        rows.insert(position, target)
        logits = torch.randn(len(rows), 64, generator=torch.Generator().manual_seed(step))
        logits[position] = step_logits(step)
        for state, token in zip(rows, sampler.sample(logits, rows).sampled_token_ids.tolist(), strict=True):
            state.output_token_ids.append(token)
    return target.output_token_ids


def test_seeded_row_ignores_the_rest_of_the_batch() -> None:
    params: dict[str, Any] = {"seed": 42, "top_p": 0.95, "repetition_penalty": 1.2}
    alone = run_steps(DefaultSampler(seed=1), make_state(**params), [], num_steps=8)
    others = [
        make_state(),
        make_state(seed=7, top_k=5, temperature=0.5),
        make_state(temperature=0.0, presence_penalty=1.0),
        make_state(min_p=0.1, logprobs=2, logit_bias={3: 5.0}),
    ]
    in_batch = run_steps(DefaultSampler(seed=2), make_state(**params), others, num_steps=8)
    assert in_batch == alone
    assert len(set(alone)) > 2, "the draws must actually be random for this test to mean anything"
    other_seed = run_steps(DefaultSampler(seed=1), make_state(**{**params, "seed": 43}), [], num_steps=8)
    assert other_seed != alone


def test_unseeded_rows_differ_between_samplers() -> None:
    logits = torch.zeros(1, 1000)

    def draw(sampler: Sampler) -> list[int]:
        return [int(sampler.sample(logits, [make_state()]).sampled_token_ids) for _ in range(10)]

    assert draw(DefaultSampler()) != draw(DefaultSampler())
    assert draw(DefaultSampler(seed=5)) == draw(DefaultSampler(seed=5)), "a seeded sampler is reproducible"


# -- logits processors ---------------------------------------------------------------------------------------------


def test_penalties_exact_values() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.5]])
    pad = 5
    out = apply_penalties(
        logits,
        prompt_token_ids=torch.tensor([[0, 4, pad]]),
        output_token_ids=torch.tensor([[2, 2, 1, pad]]),
        presence_penalties=torch.tensor([0.25]),
        frequency_penalties=torch.tensor([0.5]),
        repetition_penalties=torch.tensor([2.0]),
    )
    # 0: prompt, positive: 2 / 2.           1: output once, negative: -1 * 2 - 0.5 - 0.25.
    # 2: output twice: 0.5 / 2 - 2 * 0.5 - 0.25.   3: unseen.   4: prompt, negative: -0.5 * 2.
    assert out.tolist() == [[1.0, -2.75, -1.0, 3.0, -1.0]]


def test_penalties_through_the_sampler_touch_only_their_rows() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.5]]).repeat(4, 1)
    states = [
        make_state(prompt=[0, 4], repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        make_state(prompt=[0, 4], temperature=0.0),  # no penalties: unchanged
        make_state(prompt=[0, 4], presence_penalty=-1.0),  # presence only: the prompt does not count
        make_state(prompt=[0, 4], logit_bias={0: 2.0, 4: 1.5}, repetition_penalty=2.0),  # bias first, then penalty
    ]
    for state in states:
        state.output_token_ids += [2, 2, 1]
    sampler = DefaultSampler(seed=0)
    metadata = SamplingMetadata.from_states(states, 5, CPU)
    out = sampler.apply_logits_processors(logits.clone(), metadata)
    assert out.tolist() == [
        [1.0, -2.75, -1.0, 3.0, -1.0],
        [2.0, -1.0, 0.5, 3.0, -0.5],
        [2.0, 0.0, 1.5, 3.0, -0.5],
        [2.0, -2.0, 0.25, 3.0, 0.5],  # (2 + 2) / 2 and (-0.5 + 1.5) / 2
    ]


def test_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0]])
    state = make_state(temperature=0.0, frequency_penalty=0.5)
    sampler = DefaultSampler()
    assert int(sampler.sample(logits, [state]).sampled_token_ids) == 1
    state.output_token_ids.append(1)
    assert int(sampler.sample(logits, [state]).sampled_token_ids) == 2


def test_logit_bias_forces_and_bans() -> None:
    logits = torch.randn(32, 50, generator=torch.Generator().manual_seed(3))
    forced = [make_state(logit_bias={17: 100.0}, temperature=1.5 if i % 2 else 0.0) for i in range(32)]
    assert DefaultSampler(seed=0).sample(logits, forced).sampled_token_ids.tolist() == [17] * 32

    best = logits.argmax(dim=-1)
    banned = [make_state(temperature=0.0, logit_bias={int(b): -100.0}) for b in best]
    out = DefaultSampler().sample(logits, banned).sampled_token_ids
    assert not torch.any(out == best)
    second = logits.topk(2, dim=-1).indices[:, 1]
    assert torch.equal(out, second)


def test_logit_bias_is_added_exactly() -> None:
    logits = torch.zeros(2, 6)
    states = [make_state(logit_bias={1: 2.5, 4: -3.0}), make_state()]
    out = DefaultSampler().apply_logits_processors(logits.clone(), SamplingMetadata.from_states(states, 6, CPU))
    assert out.tolist() == [[0.0, 2.5, 0.0, 0.0, -3.0, 0.0], [0.0] * 6]


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_eos_and_stop_ids_until_reached(ignore_eos: bool) -> None:
    # eos (0) is the argmax, stop id 5 the runner-up, token 2 third.
    logits = torch.tensor([[9.0, 1.0, 7.0, 0.0, 0.0, 8.0]])
    state = make_state(temperature=0.0, min_tokens=3, stop_token_ids=[5], ignore_eos=ignore_eos)
    sampler = DefaultSampler()
    tokens = []
    for _ in range(4):
        token = int(sampler.sample(logits, [state]).sampled_token_ids)
        tokens.append(token)
        state.output_token_ids.append(token)
    assert tokens == [2, 2, 2, 0]


def test_ignore_eos_does_not_change_sampling() -> None:
    logits = torch.tensor([[9.0, 1.0, 7.0]])
    assert int(DefaultSampler().sample(logits, [make_state(temperature=0.0, ignore_eos=True)]).sampled_token_ids) == 0


def test_out_of_vocabulary_ids_fail_clearly() -> None:
    with pytest.raises(SamplingParamsError, match="logit_bias"):
        DefaultSampler().sample(torch.zeros(1, 10), [make_state(logit_bias={10: 1.0})])
    with pytest.raises(SamplingParamsError, match="stop_token_ids"):
        DefaultSampler().sample(torch.zeros(1, 10), [make_state(min_tokens=2, stop_token_ids=[12])])


def test_inputs_are_not_modified() -> None:
    logits = torch.randn(2, 20)
    before = logits.clone()
    states = [make_state(logit_bias={3: 50.0}, repetition_penalty=1.5, min_tokens=1), make_state(temperature=0.0)]
    DefaultSampler().sample(logits, states)
    assert torch.equal(logits, before)
    assert [s.output_token_ids for s in states] == [[], []]


# -- logprobs ------------------------------------------------------------------------------------------------------


def test_logprobs_are_of_the_raw_logits() -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(11))
    states = [
        make_state(logprobs=0, temperature=0.5, top_k=3, seed=1),
        make_state(logprobs=3, logit_bias={int(logits[1].argmin()): 100.0}),  # forces the least likely token
        make_state(repetition_penalty=1.5),  # asks for none
        make_state(logprobs=5, temperature=0.0, frequency_penalty=1.0),
    ]
    out = DefaultSampler(seed=0).sample(logits, states)
    assert out.logprobs is not None and out.logprobs.logprob_token_ids.shape == (4, 6)
    raw = logits.log_softmax(dim=-1)
    rows = out.to_lists()
    assert rows[2].logprobs is None
    assert rows[1].token_id == int(logits[1].argmin())
    for i, k in [(0, 0), (1, 3), (3, 5)]:
        row = rows[i]
        assert row.token_id == int(out.sampled_token_ids[i])
        lp = row.logprobs
        assert lp is not None
        assert lp.logprob == pytest.approx(float(raw[i, row.token_id]), abs=1e-6)
        assert lp.rank == int((raw[i] >= raw[i, row.token_id]).sum())
        top = raw[i].topk(k)
        assert lp.top_token_ids == top.indices.tolist()
        assert lp.top_logprobs == pytest.approx(top.values.tolist(), abs=1e-6)
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
    assert rows[1].logprobs is not None and rows[1].logprobs.rank == 30, "the forced token is the least likely"


def test_to_lists_matches_the_tensors_exactly() -> None:
    logits = torch.randn(3, 40) * 10
    logits[1, 5] = float("-inf")
    states = [make_state(logprobs=20), make_state(logprobs=20, temperature=0.0), make_state(logprobs=1)]
    out = DefaultSampler(seed=0).sample(logits, states)
    assert out.logprobs is not None
    rows = out.to_lists()
    for i, row in enumerate(rows):
        assert row.token_id == out.sampled_token_ids[i].item()
        assert row.logprobs is not None
        assert row.logprobs.logprob == out.logprobs.logprobs[i, 0].item()
        assert row.logprobs.rank == out.logprobs.selected_token_ranks[i].item()
        k = states[i].params.logprobs
        assert k is not None
        assert row.logprobs.top_logprobs == out.logprobs.logprobs[i, 1 : 1 + k].tolist()
        assert row.logprobs.top_token_ids == out.logprobs.logprob_token_ids[i, 1 : 1 + k].tolist()


# -- mixed batches -------------------------------------------------------------------------------------------------


def mixed_params() -> list[dict[str, Any]]:
    return [
        {"temperature": 0.0},
        {"temperature": 0.0, "repetition_penalty": 1.3, "frequency_penalty": 0.4, "presence_penalty": 0.2},
        {"seed": 3, "top_k": 5, "temperature": 0.8},
        {"seed": 4, "top_p": 0.9, "min_p": 0.05, "logprobs": 3},
        {"top_k": 1, "temperature": 1.7, "logprobs": 0},  # unseeded but deterministic
        {"temperature": 0.0, "logit_bias": {9: 2.0}, "min_tokens": 2, "stop_token_ids": [9]},
        {"seed": 5, "presence_penalty": -0.5, "logprobs": 2},
    ]


def test_mixed_batch_matches_each_row_alone() -> None:
    num_steps, vocab_size = 6, 64
    batch = [make_state(prompt=[4, 5, 6], **p) for p in mixed_params()]
    alone = [make_state(prompt=[4, 5, 6], **p) for p in mixed_params()]
    batch_sampler, solo_sampler = DefaultSampler(seed=1), DefaultSampler(seed=2)
    for step in range(num_steps):
        logits = torch.randn(len(batch), vocab_size, generator=torch.Generator().manual_seed(step))
        batch_rows = batch_sampler.sample(logits, batch).to_lists()
        solo_rows: list[SampledToken] = [
            solo_sampler.sample(logits[i : i + 1], [state]).to_lists()[0] for i, state in enumerate(alone)
        ]
        assert batch_rows == solo_rows, f"step {step}"
        for state, solo_state, row in zip(batch, alone, batch_rows, strict=True):
            state.output_token_ids.append(row.token_id)
            solo_state.output_token_ids.append(row.token_id)
    # The rows really did different things.
    greedy_plain, greedy_penalised = batch[0].output_token_ids, batch[1].output_token_ids
    assert greedy_plain != greedy_penalised
    assert all(t != 9 for t in batch[5].output_token_ids[:2])


def test_empty_batch() -> None:
    out = DefaultSampler().sample(torch.zeros(0, 10), [])
    assert out.sampled_token_ids.shape == (0,) and out.to_lists() == []


# -- registry ------------------------------------------------------------------------------------------------------


def test_registry() -> None:
    assert "default" in samplers()
    sampler = get_sampler("default", seed=3)
    assert isinstance(sampler, DefaultSampler) and sampler.seed == 3 and sampler.name == "default"
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_sampler("default")(DefaultSampler)


def test_generator_is_per_request_and_only_when_seeded() -> None:
    assert make_state().generator is None
    assert make_state(temperature=0.0, seed=1).generator is None
    a, b = make_state(seed=1), make_state(seed=1)
    assert a.generator is not None and b.generator is not None and a.generator is not b.generator
    assert math.isclose(float(torch.rand(1, generator=a.generator)), float(torch.rand(1, generator=b.generator)))


def test_per_request_sampler_draws_what_the_batched_one_draws() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    prompt = [1, 4, 4, 9]

    def batch() -> list[SamplingState]:
        return [
            make_state(prompt, temperature=0),
            make_state(prompt, temperature=0, repetition_penalty=1.3, logit_bias={7: 5.0}),
            make_state(prompt, temperature=0.8, top_k=5, seed=11, logprobs=3),
            make_state(prompt, temperature=1.0, top_p=0.7, min_p=0.05, seed=12),
            make_state(prompt, temperature=0, min_tokens=2, logprobs=0),
            make_state(prompt, temperature=0.5, seed=13, frequency_penalty=0.5),
        ]

    batched = get_sampler("default").sample(logits, batch()).to_lists()
    one_by_one = get_sampler("per_request").sample(logits, batch()).to_lists()
    assert [t.token_id for t in one_by_one] == [t.token_id for t in batched]
    for a, b in zip(one_by_one, batched, strict=True):
        assert (a.logprobs is None) == (b.logprobs is None)
        if a.logprobs is not None and b.logprobs is not None:
            assert a.logprobs.top_token_ids == b.logprobs.top_token_ids and a.logprobs.rank == b.logprobs.rank
            assert a.logprobs.logprob == pytest.approx(b.logprobs.logprob)
