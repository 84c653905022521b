"""``/v1/completions`` as clients send it: batches of prompts, token ids, ``echo``, ``text_offset``.

What vLLM 0.32 does, and modkit with it:

- ``prompt`` may be a text, a list of token ids, a list of texts or a list of token-id lists
  (lm-eval's ``local-completions`` sends token ids). A batch of P prompts with ``n``
  completions each has P * n choices, prompt by prompt: prompt ``p``'s completion ``i`` is
  choice ``p * n + i``; usage counts each prompt's tokens once.
- ``echo``: each choice's text starts with its prompt's (token ids decoded); with
  ``logprobs``, its logprobs start with the prompt tokens' (the engine's
  ``prompt_logprobs``), the first ``None``: what lm-eval's loglikelihood tasks read.
- completions logprobs have ``text_offset``: where each token starts in the choice's text,
  from 0, continued across the chunks of a stream.

Where modkit differs: a request may ask for at most 1,024 completions (prompts x n; vLLM
bounds only the prompts, at 1,024); ``echo`` with ``max_tokens: 0`` (vLLM: the prompt
alone) is a 400, as any ``max_tokens`` below 1.

The oracles: the server itself, one prompt at a time (a batch must answer what each of its
prompts alone answers), and for prompt logprobs HF transformers' ``log_softmax`` of the same
prompt. The app runs in this process over the in-process engine; the last test sends
batches through the six-process pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM
from waiting import wait_until

from modkit import LLM, Pipeline, SamplingParams
from modkit.engine.async_engine import AsyncEngine
from modkit.engine.config import EngineConfig
from modkit.frontend import EMBEDDED_MODEL_NAME
from modkit.frontend.app import build_app
from modkit.model.loader import embedded_model_dir

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

    def idle() -> bool:  # the other prompts' requests, aborted (on the engine's thread)
        stats = engine.stats()
        return stats["num_requests_running"] == 0 and stats["num_requests_waiting"] == 0

    assert wait_until(idle, 10), engine.stats()


def test_a_client_that_leaves_a_streamed_batch_aborts_every_prompt(http: TestClient, engine: AsyncEngine) -> None:
    steps_before = engine.stats()["num_steps"]
    body = {"prompt": PROMPTS, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        next(line for line in response.iter_lines() if line.startswith("data: "))  # then hang up

    def idle() -> bool:
        stats = engine.stats()
        return stats["num_requests_running"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]

    assert wait_until(idle, 10), engine.stats()
    assert engine.stats()["num_steps"] - steps_before < 400, "aborted, not run to their 400 tokens"


def test_the_openai_client_sends_batches(http: TestClient) -> None:
    server = http.base_url
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", http_client=http, max_retries=0)
    reply = client.completions.create(model=EMBEDDED_MODEL_NAME, prompt=PROMPTS[:2], max_tokens=4, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[1].text == complete(http, prompt=PROMPTS[1], max_tokens=4, temperature=0)["choices"][0]["text"]


LONG = "Once upon a time there was a little dog who lived in a small house near the big park, and every day"


@pytest.fixture(scope="module")
def hf_logprobs() -> Any:
    """log P(token i | tokens before it) for each token after the first, by HF transformers."""
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32)

    def logprobs(ids: list[int]) -> list[float]:
        with torch.no_grad():
            lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, V)
        return [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]

    return logprobs


@pytest.mark.parametrize(
    "engine_kwargs",
    [{}, {"max_num_batched_tokens": 8}],  # the whole prompt in one step, or in chunks of at most 8 tokens
    ids=["one_step", "chunked"],
)
def test_prompt_logprobs_equal_hf_log_softmax(engine: AsyncEngine, hf_logprobs: Any, engine_kwargs: dict) -> None:
    llm = LLM(num_kv_blocks=64, **engine_kwargs)
    ids = ids_of(engine, LONG)
    warm = llm.generate({"prompt_token_ids": ids[:20]}, SamplingParams(max_tokens=1), use_tqdm=False)  # caches a prefix
    assert warm[0].prompt_logprobs is None  # not asked for
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)
    for _ in range(2):  # the second time every full block is cached: computed again all the same
        [out] = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
        assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
        ours = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
        assert ours == pytest.approx(hf_logprobs(ids), abs=1e-4)
        for entry, token in zip(out.prompt_logprobs[1:], ids[1:], strict=True):
            assert len(entry) in (3, 4) and entry[token].rank is not None
            best = max(entry.values(), key=lambda lp: lp.logprob)
            assert best.rank == 1 and (entry[token].rank == 1) == (entry[token].logprob == best.logprob)


def test_echo_with_logprobs_scores_the_prompt_as_hf(http: TestClient, engine: AsyncEngine, hf_logprobs: Any) -> None:
    """lm-eval's loglikelihood request: token ids, echo, logprobs 1, max_tokens 1."""
    ids = ids_of(engine, LONG)
    body = complete(http, prompt=[ids, ids[:12]], echo=True, logprobs=1, max_tokens=1, temperature=0)
    for choice, prompt in zip(body["choices"], [ids, ids[:12]], strict=True):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(prompt) + 1 and choice["text"].startswith(engine.tokenizer.decode(prompt))
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert logprobs["token_logprobs"][1 : len(prompt)] == pytest.approx(hf_logprobs(prompt), abs=1e-4)
        assert logprobs["text_offset"][0] == 0 and "".join(logprobs["tokens"]) == choice["text"]
        for token_lp, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:], strict=True):
            assert len(top) == 1 and max(top.values()) >= token_lp  # lm-eval's is_greedy reads this
    chunks = streamed(http, prompt=ids[:12], echo=True, logprobs=1, max_tokens=3, temperature=0)
    streamed_lps = [
        lp for c in chunks for ch in c["choices"] if ch["logprobs"] for lp in ch["logprobs"]["token_logprobs"]
    ]
    whole = complete(http, prompt=ids[:12], echo=True, logprobs=1, max_tokens=3, temperature=0)
    assert streamed_lps == whole["choices"][0]["logprobs"]["token_logprobs"]


@pytest.mark.slow
def test_the_pipeline_serves_token_id_batches_as_the_engine_does(http: TestClient, engine: AsyncEngine) -> None:
    prompts = [ids_of(engine, p) for p in [*PROMPTS, LONG]]
    expected = complete(http, prompt=prompts, echo=True, logprobs=2, **GREEDY)
    # Prompt chunks of at most 8 tokens: the long prompt's logprobs cross the pipeline in pieces.
    config = {"num_kv_blocks": 256, "max_model_len": 512, "max_num_batched_tokens": 8}
    with Pipeline.launch(ports="auto", progress=False, **config) as pipeline:
        client = pipeline.client()
        reply = client.completions.create(model=pipeline.model_name, prompt=prompts, echo=True, logprobs=2, **GREEDY)
        chunks = client.completions.create(model=pipeline.model_name, prompt=prompts, stream=True, **GREEDY)
        streamed_texts: dict[int, str] = {}
        for chunk in chunks:
            for c in chunk.choices:
                streamed_texts[c.index] = streamed_texts.get(c.index, "") + c.text
    assert [c.text for c in reply.choices] == [c["text"] for c in expected["choices"]]
    for theirs, ours in zip(reply.choices, expected["choices"], strict=True):
        assert theirs.logprobs is not None and theirs.logprobs.token_logprobs is not None
        assert theirs.logprobs.token_logprobs[0] is None
        assert theirs.logprobs.token_logprobs[1:] == pytest.approx(ours["logprobs"]["token_logprobs"][1:], abs=1e-5)
    assert reply.usage is not None and reply.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert [streamed_texts[i] for i in range(len(prompts))] == [
        c["text"][len(engine.tokenizer.decode(p)) :] for c, p in zip(expected["choices"], prompts, strict=True)
    ]
