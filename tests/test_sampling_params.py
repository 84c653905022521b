"""SamplingParams: vLLM's defaults, normalisation, and one clear error per bad value."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from modkit.sampling_params import SamplingParams, SamplingParamsError, SamplingType


def test_defaults_are_vllms() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, 0, 0.0, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.stop, p.stop_token_ids, p.ignore_eos) == ([], [], False)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs, p.logit_bias) == (16, 0, None, None, None)
    assert (p.skip_special_tokens, p.include_stop_str_in_output, p.detokenize) == (True, False, True)
    assert p.sampling_type == SamplingType.RANDOM


def test_normalisation() -> None:
    assert SamplingParams(stop="###").stop == ["###"]  # type: ignore[arg-type]
    assert SamplingParams(stop=None).stop == []  # type: ignore[arg-type]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]  # type: ignore[arg-type]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop_token_ids=[5, 3, 5]).stop_token_ids == [5, 3]
    p = SamplingParams(temperature=0, top_p=1, presence_penalty=1)
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float) and isinstance(p.presence_penalty, float)
    bias = {3: 1.0}
    p = SamplingParams(logit_bias=bias)
    bias[4] = 2.0
    assert p.logit_bias == {3: 1.0}, "the params keep their own copy"


def test_frozen() -> None:
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"temperature": 0.0}, SamplingType.GREEDY),
        ({"temperature": 9e-6}, SamplingType.GREEDY),
        ({"temperature": 0.0, "seed": 3}, SamplingType.GREEDY),
        ({"temperature": 1e-5}, SamplingType.RANDOM),
        ({"temperature": 0.7, "seed": 3}, SamplingType.RANDOM_SEED),
        ({"seed": 0}, SamplingType.RANDOM_SEED),
    ],
)
def test_sampling_type(kwargs: dict[str, Any], expected: SamplingType) -> None:
    assert SamplingParams(**kwargs).sampling_type == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_p": 1.0, "min_p": 1.0, "top_k": 1},
        {"presence_penalty": -2, "frequency_penalty": 2, "repetition_penalty": 1e-3},
        {"logprobs": 0, "prompt_logprobs": 20},
        {"logit_bias": {0: -100, 7: 100.0}},
        {"max_tokens": None, "min_tokens": 1000},
        {"max_tokens": 5, "min_tokens": 5},
        {"seed": -(2**63)},
        {"seed": 2**64 - 1},
        {"n": 4, "seed": 1},
    ],
)
def test_edge_values_accepted(kwargs: dict[str, Any]) -> None:
    SamplingParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"n": 0}, "n", "n must be >= 1, got 0"),
        ({"n": 2, "temperature": 0}, "n", "greedy"),
        ({"temperature": -1.0}, "temperature", "temperature must be >= 0, got -1.0"),
        ({"temperature": float("nan")}, "temperature", "finite"),
        ({"temperature": "hot"}, "temperature", "'hot'"),
        ({"top_p": 1.5}, "top_p", "top_p must be in (0, 1], got 1.5"),
        ({"top_p": 0.0}, "top_p", "(0, 1]"),
        ({"top_k": -2}, "top_k", "got -2"),
        ({"top_k": 2.5}, "top_k", "integer"),
        ({"min_p": 1.1}, "min_p", "[0, 1]"),
        ({"seed": 1.5}, "seed", "integer"),
        ({"seed": True}, "seed", "integer"),
        ({"seed": 2**64}, "seed", "[-2**63, 2**64)"),
        ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2], got 2.5"),
        ({"frequency_penalty": -3}, "frequency_penalty", "[-2, 2], got -3"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "> 0"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty", "finite"),
        ({"stop": ["ok", ""]}, "stop", "non-empty"),
        ({"stop": 5}, "stop", "got 5"),
        ({"stop": "x", "detokenize": False}, "stop", "detokenize"),
        ({"stop_token_ids": [1, -4]}, "stop_token_ids", ">= 0"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids", "integer"),
        ({"ignore_eos": 1}, "ignore_eos", "True or False"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be >= 1"),
        ({"min_tokens": -1}, "min_tokens", ">= 0"),
        ({"min_tokens": 17}, "min_tokens", "min_tokens must be <= max_tokens (16), got 17"),
        ({"logprobs": -1}, "logprobs", "[0, 20]"),
        ({"logprobs": 21}, "logprobs", "OpenAI"),
        ({"prompt_logprobs": 21}, "prompt_logprobs", "[0, 20]"),
        ({"logit_bias": {3: 101.0}}, "logit_bias", "[-100, 100], got 101.0"),
        ({"logit_bias": {"3": 1.0}}, "logit_bias", "token ids"),
        ({"logit_bias": [3]}, "logit_bias", "dict"),
    ],
)
def test_validation_errors_name_the_field(kwargs: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(SamplingParamsError) as caught:
        SamplingParams(**kwargs)
    assert caught.value.field == field
    message = str(caught.value)
    assert message.startswith(f"{field} "), message
    assert fragment in message, message
    assert isinstance(caught.value, ValueError)


def test_child_params_offset_the_seed() -> None:
    parent = SamplingParams(n=3, seed=10, temperature=0.8, stop=["x"])
    children = [parent.child_params(i) for i in range(3)]
    assert [c.seed for c in children] == [10, 11, 12]
    assert all(c.n == 1 and c.temperature == 0.8 and c.stop == ["x"] for c in children)
    assert SamplingParams(n=2).child_params(1).seed is None
    with pytest.raises(IndexError):
        parent.child_params(3)


def test_check_token_ids() -> None:
    SamplingParams(stop_token_ids=[9], logit_bias={9: 1.0}).check_token_ids(10)
    with pytest.raises(SamplingParamsError, match="stop_token_ids") as caught:
        SamplingParams(stop_token_ids=[10]).check_token_ids(10)
    assert caught.value.field == "stop_token_ids"
    with pytest.raises(SamplingParamsError, match="logit_bias"):
        SamplingParams(logit_bias={12: 1.0}).check_token_ids(10)
