"""Structured outputs: the grammar stage of the sampler, in-process and through the pipeline's API.

The embedded tiny model writes free text; asked for JSON, a regex, a choice or a grammar it
must still produce exactly that, because the sampler masks every other token. The oracles:
``jsonschema`` for JSON, ``re.fullmatch`` for regexes, the list for choices, the model's own
unconstrained output for rows that ask for nothing, and the pydantic model for ``parse``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field
from waiting import wait_until

from modkit import LLM, Pipeline, SamplingParams
from modkit.model import load_tokenizer
from modkit.sampler import DefaultSampler, GrammarBackend, SamplingState, get_sampler
from modkit.sampler.grammar import MAX_JSON_WHITESPACE
from modkit.sampling_params import SamplingParamsError, StructuredOutputsParams

PROMPTS = ["Who are you?", "What is 2 plus 3?", "Tell me a story about a cat.", "What color is the sky?"]
# Bounded strings: a tiny model never closes an unbounded one (it writes until max_tokens).
PET_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    },
    "required": ["name", "age", "kind"],
    "additionalProperties": False,
}
CHOICES = ["red", "green", "blue"]
REGEX = r"[a-z]{2,8}-[0-9]{3}"
GRAMMAR = 'root ::= ("yes" | "no") " because " [a-z]+ "."'


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(num_kv_blocks=256, max_model_len=512)


def chat(llm: LLM, prompt: str, params: SamplingParams, must_stop: bool = True) -> list[str]:
    """The outputs' texts; each must have ended because its grammar was complete, unless not ``must_stop``."""
    outputs = llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)[0].outputs
    if not must_stop:
        return [o.text for o in outputs if o.finish_reason == "stop"]
    assert all(o.finish_reason == "stop" for o in outputs), [(o.text, o.finish_reason) for o in outputs]
    return [o.text for o in outputs]


def constrained(temperature: float = 0.0, n: int = 1, **constraint: object) -> SamplingParams:
    seed = 1 if temperature else None
    return SamplingParams(
        temperature=temperature,
        n=n,
        seed=seed,
        max_tokens=400,
        structured_outputs=StructuredOutputsParams(**constraint),
    )


@pytest.mark.parametrize("prompt", PROMPTS)
def test_json_schema_outputs_parse_and_validate(llm: LLM, prompt: str) -> None:
    for text in chat(llm, prompt, constrained(json=PET_SCHEMA)) + chat(
        llm, prompt, constrained(0.9, 3, json=PET_SCHEMA)
    ):
        jsonschema.validate(json.loads(text), PET_SCHEMA)
    (compact,) = chat(llm, prompt, constrained(json=PET_SCHEMA, disable_any_whitespace=True))
    assert compact == json.dumps(json.loads(compact), separators=(",", ":"))


def test_json_object_regex_choice_and_grammar(llm: LLM) -> None:
    # Any object: the tiny model rarely closes a string it opened, so some outputs run to
    # max_tokens; every one that ends is an object.
    objects = []
    for prompt in PROMPTS:
        objects += chat(llm, prompt, constrained(0.8, 4, json_object=True), must_stop=False)
    assert objects
    for text in objects:
        assert isinstance(json.loads(text), dict)
        assert not re.search(rf"\s{{{MAX_JSON_WHITESPACE + 1}}}", text)
    for prompt in PROMPTS:
        for text in chat(llm, prompt, constrained(0.8, 4, regex=REGEX)):
            assert re.fullmatch(REGEX, text), text
        for text in chat(llm, prompt, constrained(0.8, 4, choice=CHOICES)) + chat(
            llm, prompt, constrained(choice=CHOICES)
        ):
            assert text in CHOICES
        for text in chat(llm, prompt, constrained(0.8, 2, grammar=GRAMMAR)):
            assert re.fullmatch(r"(yes|no) because [a-z]+\.", text), text


def test_constrained_and_free_rows_share_a_batch(llm: LLM) -> None:
    free = SamplingParams(temperature=0, max_tokens=30)
    alone = [llm.generate(p, free, use_tqdm=False)[0].outputs[0].text for p in PROMPTS]
    mixed = llm.generate(PROMPTS * 2, [free] * 4 + [constrained(choice=CHOICES)] * 4, use_tqdm=False)
    assert [m.outputs[0].text for m in mixed[:4]] == alone, "a free row is sampled as if alone"
    assert all(m.outputs[0].text in CHOICES for m in mixed[4:])


def test_a_trace_counts_the_rows_the_grammar_stage_masked(llm: LLM) -> None:
    """Each forward says how many of the rows it sampled were constrained: here the four choice rows
    until each one's grammar completes, and no free row ever."""
    from modkit.trace.inprocess import record_forwards

    free = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    with record_forwards(llm) as recording:
        outputs = llm.generate(PROMPTS * 2, [free] * 4 + [constrained(choice=CHOICES)] * 4, use_tqdm=False)
    forwards = recording.trace().forwards
    longest_choice = max(len(o.outputs[0].token_ids) for o in outputs[4:])
    counts = forwards.num_constrained.tolist()
    assert counts[0] == 4 and max(counts) == 4, "the four constrained rows, from their first token"
    assert sum(counts) == sum(len(o.outputs[0].token_ids) for o in outputs[4:]), "one per constrained token"
    assert all(c == 0 for c in counts[longest_choice:]), "none once the grammars are complete"
    with record_forwards(llm) as recording:
        llm.generate(PROMPTS, free, use_tqdm=False)
    assert (recording.trace().forwards.num_constrained == 0).all()


def test_the_stage_masks_what_the_grammar_forbids_and_follows_the_output() -> None:
    tokenizer = load_tokenizer(None)
    vocab_size, eos = 2240, (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    backend = GrammarBackend(lambda: tokenizer, vocab_size, eos)
    choice = StructuredOutputsParams(choice=["yes", "no"])
    params = SamplingParams(temperature=1.0, structured_outputs=choice)
    state = SamplingState.create(params, [1, 2], "cpu", eos, backend.grammar(choice))
    free = SamplingState.create(SamplingParams(temperature=1.0), [1, 2], "cpu", eos)
    assert state.reads_output_tokens and not DefaultSampler().can_sample_ahead([state, free])
    logits = torch.randn(2, vocab_size, generator=torch.Generator().manual_seed(0))  # (2, V)

    probs = DefaultSampler().probs(logits, [state, free])  # (2, V)
    allowed = {tokenizer.decode([t]) for t in probs[0].nonzero().flatten().tolist()}
    assert allowed
    assert all("yes".startswith(text) or "no".startswith(text) for text in allowed), allowed
    assert bool((probs[1] > 0).all()), "a free row is untouched"

    state.output_token_ids = tokenizer.encode("yes")
    for sampler in (DefaultSampler(), get_sampler("per_request")):
        assert sampler.sample(logits[:1], [state]).sampled_token_ids.tolist() == list(eos), "complete: only eos"
    assert state.grammar is not None and state.grammar.num_accepted == len(state.output_token_ids)
    state.output_token_ids += list(eos)  # ignore_eos: the request goes on, eos after eos
    assert DefaultSampler().sample(logits[:1], [state]).sampled_token_ids.tolist() == list(eos)
    assert state.grammar.is_terminated


def test_bad_constraints_are_refused_naming_the_field() -> None:
    cases = {
        "structured_outputs.json": {"json": {"type": "bogus"}},
        "structured_outputs.regex": {"regex": "(unclosed"},
        "structured_outputs.grammar": {"grammar": "root ::= undefined_rule"},
        "structured_outputs.choice": {"choice": []},
        "structured_outputs": {"regex": "a", "choice": ["a"]},
    }
    for field, kwargs in cases.items():
        with pytest.raises(SamplingParamsError) as err:
            StructuredOutputsParams(**kwargs)  # type: ignore[arg-type]
        assert err.value.field == field, (kwargs, err.value)


def test_constrained_rows_are_never_launched_ahead(llm: LLM) -> None:
    """Async scheduling launches a step planned ahead before the last one's tokens reach the host
    (on a GPU; forced here on the CPU): a grammar must see every token, so a step with a
    constrained row waits for them, and the outputs are those of a step at a time."""
    params = [
        SamplingParams(temperature=0, max_tokens=40),
        constrained(json=PET_SCHEMA),
        constrained(0.7, 2, regex=REGEX),
    ]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]

    def run() -> list[list[str]]:
        return [[o.text for o in r.outputs] for r in llm.generate(prompts, params, use_tqdm=False)]

    llm.engine.launch_ahead = False
    one_at_a_time = run()
    llm.engine.launch_ahead = True
    try:
        launched_before = llm.engine.num_launched_ahead
        assert run() == one_at_a_time
        free_only = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
        assert free_only[0].outputs[0].text == one_at_a_time[0][0]
        assert llm.engine.num_launched_ahead > launched_before, "free rows alone are launched ahead"
    finally:
        llm.engine.launch_ahead = False


# -- through the pipeline's OpenAI API ------------------------------------------------


class Pet(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=30)
    kind: Literal["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def pipeline() -> Iterator[Pipeline]:
    with Pipeline.launch(num_kv_blocks=256, max_model_len=512, ports="auto", progress=False) as p:
        yield p


@pytest.mark.slow
def test_parse_with_a_pydantic_model_and_extra_body_constraints(pipeline: Pipeline) -> None:
    client = pipeline.client()
    model = client.models.list().data[0].id
    for prompt in PROMPTS[:2]:
        messages = [{"role": "user", "content": prompt}]
        done = client.chat.completions.parse(model=model, messages=messages, response_format=Pet, max_tokens=400)  # type: ignore[arg-type]
        assert isinstance(done.choices[0].message.parsed, Pet) and done.choices[0].finish_reason == "stop"
        text = (
            client.completions.create(
                model=model, prompt=prompt, max_tokens=50, extra_body={"structured_outputs": {"regex": REGEX}}
            )
            .choices[0]
            .text
        )
        assert re.fullmatch(REGEX, text), text
        stream = client.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            max_tokens=20,
            extra_body={"structured_outputs": {"choice": CHOICES}},
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) in CHOICES
    # The sampler process counts the tokens its grammar stage masked (reports arrive after each step).
    assert wait_until(lambda: pipeline.stats()["sampler"]["num_tokens_constrained"] >= 2 * 3, timeout_s=10)


@pytest.mark.slow
def test_the_pipelines_trace_counts_the_constrained_rows(pipeline: Pipeline) -> None:
    """The worker's forward events say how many sampled rows a grammar constrained, as in-process."""
    client = pipeline.client()
    model = client.models.list().data[0].id
    pipeline.clear_trace()
    only = {"structured_outputs": {"choice": CHOICES}}
    reply = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=40, temperature=0, extra_body=only)
    assert reply.choices[0].text in CHOICES
    wait_until(lambda: reply.usage.completion_tokens <= pipeline.trace().forwards.num_sampled.sum(), timeout_s=10)
    forwards = pipeline.trace().forwards
    # Every row sampled was this request's, so every one was constrained: its tokens, and one more
    # where a step planned ahead ran before its end was known (async scheduling drops that token).
    assert (forwards.num_constrained == forwards.num_sampled).all()
    assert forwards.num_constrained.sum() >= reply.usage.completion_tokens


@pytest.mark.slow
def test_bad_constraints_are_a_400_naming_the_field(pipeline: Pipeline) -> None:
    body = {"model": pipeline.client().models.list().data[0].id, "messages": [{"role": "user", "content": "hi"}]}
    cases = {
        "response_format": {
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}
        },
        "structured_outputs": {"structured_outputs": {"regex": "(unclosed"}},
        "guided_json": {"guided_json": {"type": "object"}},
    }
    for param, extra in cases.items():
        response = httpx.post(f"{pipeline.url}/v1/chat/completions", json={**body, **extra}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    with pytest.raises(openai.BadRequestError):
        pipeline.client().chat.completions.create(
            extra_body={"structured_outputs": {"structural_tag": "{}"}},
            **body,  # type: ignore[arg-type]
        )


@pytest.mark.slow
def test_the_grammar_stage_swaps_with_the_sampler(pipeline: Pipeline) -> None:
    client = pipeline.client()
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Who are you?"}]
    free = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12)  # type: ignore[arg-type]

    def ask() -> str | None:
        done = client.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=12,
            extra_body={"structured_outputs": {"choice": CHOICES}},
        )
        return done.choices[0].message.content

    class SkipsTheGrammar(DefaultSampler):  # defined here, so that it is sent by value
        """The default sampler with its structured-outputs stage replaced by one that does nothing."""

        def apply_structured_outputs(self, logits: torch.Tensor, grammar: object) -> torch.Tensor:
            return logits

    assert ask() in CHOICES
    pipeline.swap("sampler", SkipsTheGrammar)
    try:
        assert ask() == free.choices[0].message.content, "without the stage, the model's own text"
    finally:
        pipeline.swap("sampler", "default")
    assert ask() in CHOICES


@pytest.mark.slow  # imports vLLM
def test_vllms_sampler_gets_the_grammar_stage_too() -> None:
    pytest.importorskip("vllm")
    tokenizer = load_tokenizer(None)
    vocab_size, eos = 2240, (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    choice = StructuredOutputsParams(choice=["yes", "no"])
    grammar = GrammarBackend(lambda: tokenizer, vocab_size, eos).grammar(choice)
    state = SamplingState.create(SamplingParams(temperature=0, structured_outputs=choice), [1, 2], "cpu", eos, grammar)
    logits = torch.randn(1, vocab_size, generator=torch.Generator().manual_seed(0))  # (1, V)
    sampler = get_sampler("vllm")
    first = sampler.sample(logits, [state]).sampled_token_ids.tolist()
    assert first == DefaultSampler().sample(logits, [state]).sampled_token_ids.tolist()
    assert any(word.startswith(tokenizer.decode(first)) for word in ("yes", "no"))
