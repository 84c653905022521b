"""``/v1/completions`` as clients send it: batches of prompts, token ids, ``echo``, ``text_offset``.

What vLLM 0.32 does, and modkit with it:

- ``prompt`` may be a text, a list of token ids, a list of texts or a list of token-id lists
  (lm-eval's ``local-completions`` sends token ids). A batch of P prompts with ``n``
  completions each has P * n choices, prompt by prompt: prompt ``p``'s completion ``i`` is
  choice ``p * n + i``; usage counts each prompt's tokens once.
- ``echo``: each choice's text starts with its prompt's (token ids decoded).
- completions logprobs have ``text_offset``: where each token starts in the choice's text,
  from 0, continued across the chunks of a stream.

Where modkit differs: ``echo`` with ``logprobs`` needs the prompt's logprobs, which the
engine does not compute yet: a 400 naming ``echo`` (vLLM answers them). A request may ask
for at most 1,024 completions (prompts x n; vLLM bounds only the prompts, at 1,024).

The oracle is the server itself, one prompt at a time: a batch must answer what each of its
prompts alone answers. The app runs in this process over the in-process engine; the last
test sends a batch of token ids through the six-process pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from modkit import Pipeline
from modkit.engine.async_engine import AsyncEngine
from modkit.engine.config import EngineConfig
from modkit.frontend import EMBEDDED_MODEL_NAME
from modkit.frontend.app import build_app

PROMPTS = ["The dog", "Once upon a time", "The cat sat on"]
GREEDY = {"max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def engine() -> Iterator[AsyncEngine]:
    engine = AsyncEngine(EngineConfig(num_kv_blocks=256, max_model_len=512))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def http(engine: AsyncEngine) -> Iterator[TestClient]:
    with TestClient(build_app(engine, EMBEDDED_MODEL_NAME)) as client:
        yield client


def complete(http: TestClient, **body: Any) -> dict[str, Any]:
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def streamed(http: TestClient, **body: Any) -> list[dict[str, Any]]:
    """The chunks of a streamed completion, [DONE] checked and left out."""
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def texts(chunks: list[dict[str, Any]]) -> dict[int, str]:
    joined: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            joined[choice["index"]] = joined.get(choice["index"], "") + choice["text"]
    return joined


def ids_of(engine: AsyncEngine, text: str) -> list[int]:
    return list(engine.tokenizer.encode(text, add_special_tokens=False))


def test_a_batch_of_texts_answers_what_each_prompt_alone_does(http: TestClient) -> None:
    alone = [complete(http, prompt=p, **GREEDY) for p in PROMPTS]
    batch = complete(http, prompt=PROMPTS, **GREEDY)
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2]
    assert [c["text"] for c in batch["choices"]] == [a["choices"][0]["text"] for a in alone]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert batch["usage"][key] == sum(a["usage"][key] for a in alone), key


def test_token_ids_answer_as_their_text(http: TestClient, engine: AsyncEngine) -> None:
    as_text = complete(http, prompt=PROMPTS, **GREEDY)
    one = complete(http, prompt=ids_of(engine, PROMPTS[0]), **GREEDY)
    assert one["choices"][0]["text"] == as_text["choices"][0]["text"]
    many = complete(http, prompt=[ids_of(engine, p) for p in PROMPTS], **GREEDY)
    assert [c["text"] for c in many["choices"]] == [c["text"] for c in as_text["choices"]]
    assert many["usage"] == as_text["usage"]


def test_n_choices_of_a_batch_are_indexed_prompt_by_prompt(http: TestClient) -> None:
    sampled = {"max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 3}
    alone = [complete(http, prompt=p, **sampled) for p in PROMPTS[:2]]
    batch = complete(http, prompt=PROMPTS[:2], **sampled)
    assert [c["index"] for c in batch["choices"]] == list(range(6))
    expected = [c["text"] for a in alone for c in a["choices"]]  # prompt 0's three, then prompt 1's
    assert [c["text"] for c in batch["choices"]] == expected


def test_a_streamed_batch_carries_the_same_choices(http: TestClient) -> None:
    whole = complete(http, prompt=PROMPTS, **GREEDY)
    chunks = streamed(http, prompt=PROMPTS, stream_options={"include_usage": True}, **GREEDY)
    assert texts(chunks) == {c["index"]: c["text"] for c in whole["choices"]}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert {chunk["id"] for chunk in chunks} == {chunks[0]["id"]}  # one response


def test_echo_puts_the_prompt_before_each_choice(http: TestClient, engine: AsyncEngine) -> None:
    plain = complete(http, prompt=PROMPTS, **GREEDY)
    echoed = complete(http, prompt=PROMPTS, echo=True, **GREEDY)
    assert [c["text"] for c in echoed["choices"]] == [
        p + c["text"] for p, c in zip(PROMPTS, plain["choices"], strict=True)
    ]
    assert echoed["usage"] == plain["usage"]
    ids = ids_of(engine, "The dog ran")
    from_ids = complete(http, prompt=ids, echo=True, **GREEDY)["choices"][0]["text"]
    assert from_ids.startswith(engine.tokenizer.decode(ids)) and len(from_ids) > len("The dog ran")
    chunks = streamed(http, prompt=PROMPTS, echo=True, **GREEDY)
    assert texts(chunks) == {c["index"]: c["text"] for c in echoed["choices"]}


def test_text_offset_says_where_each_token_starts(http: TestClient) -> None:
    body = complete(http, prompt=PROMPTS[1], max_tokens=12, temperature=0, logprobs=2, ignore_eos=True)
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"][0] == 0
    for start, token, following in zip(
        logprobs["text_offset"], logprobs["tokens"], logprobs["text_offset"][1:], strict=False
    ):
        assert following == start + len(token)
    chunks = streamed(http, prompt=PROMPTS[1], max_tokens=12, temperature=0, logprobs=2, ignore_eos=True)
    offsets = [o for chunk in chunks for c in chunk["choices"] if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert offsets == logprobs["text_offset"]  # continued across chunks


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": "The dog", "echo": True, "logprobs": 1}, "echo"),  # vLLM answers this; modkit cannot yet
        ({"prompt": ["The dog", ""]}, "prompt"),
        ({"prompt": [[5, 6], []]}, "prompt"),
        ({"prompt": [[5], [10**9]]}, None),  # outside the vocabulary, found by the engine
        ({"prompt": ["a", [5]]}, "prompt"),  # texts and ids mixed
        ({"prompt": ["a"] * 9, "n": 128, "temperature": 1}, "prompt"),  # 1,152 completions
        ({"prompt": ["a", "a " * 600]}, "prompt"),  # the second is longer than the context
    ],
)
def test_bad_batches_are_refused_whole(
    http: TestClient, engine: AsyncEngine, fields: dict[str, Any], param: str | None
) -> None:
    response = http.post("/v1/completions", json={"max_tokens": 4, **fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert engine.stats()["num_requests_running"] == 0 and engine.stats()["num_requests_waiting"] == 0


def test_the_openai_client_sends_batches(http: TestClient) -> None:
    server = http.base_url
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", http_client=http, max_retries=0)
    reply = client.completions.create(model=EMBEDDED_MODEL_NAME, prompt=PROMPTS[:2], max_tokens=4, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[1].text == complete(http, prompt=PROMPTS[1], max_tokens=4, temperature=0)["choices"][0]["text"]


@pytest.mark.slow
def test_the_pipeline_serves_token_id_batches_as_the_engine_does(http: TestClient, engine: AsyncEngine) -> None:
    prompts = [ids_of(engine, p) for p in PROMPTS]
    expected = complete(http, prompt=prompts, echo=True, **GREEDY)
    with Pipeline.launch(ports="auto", num_kv_blocks=256, max_model_len=512, progress=False) as pipeline:
        client = pipeline.client()
        reply = client.completions.create(model=pipeline.model_name, prompt=prompts, echo=True, **GREEDY)
        chunks = client.completions.create(model=pipeline.model_name, prompt=prompts, stream=True, **GREEDY)
        streamed_texts: dict[int, str] = {}
        for chunk in chunks:
            for c in chunk.choices:
                streamed_texts[c.index] = streamed_texts.get(c.index, "") + c.text
    assert [c.text for c in reply.choices] == [c["text"] for c in expected["choices"]]
    assert reply.usage is not None and reply.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert [streamed_texts[i] for i in range(3)] == [
        c["text"][len(engine.tokenizer.decode(p)) :] for c, p in zip(expected["choices"], prompts, strict=True)
    ]
