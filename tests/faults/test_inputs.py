"""Bad input gets an OpenAI-shaped 4xx at once, never a 5xx, and the server keeps serving.

One server for the module: ``python -m modkit.frontend`` (the engine in its process) with
an API key. The checks live in the app, which the pipeline's frontend serves too.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_server import KEY, Served, start
from waiting import wait_until

from modkit.config import ConfigError, PipelineConfig
from modkit.frontend import EMBEDDED_MODEL_NAME

AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}
HELLO = [{"role": "user", "content": "Hello!"}]
CHAT = {"model": EMBEDDED_MODEL_NAME, "messages": HELLO, "max_tokens": 4, "temperature": 0}
TEXT = {"model": EMBEDDED_MODEL_NAME, "prompt": "The dog", "max_tokens": 4, "temperature": 0}
MAX_BODY = 1 << 20  # a small limit, so that the tests send little


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("inputs") / "server.log"
    served = start("in_process", log, ["--max-request-body-bytes", str(MAX_BODY)])
    yield served
    served.proc.terminate()
    served.proc.wait(timeout=60)
    assert "Traceback" not in log.read_text(), log.read_text()  # nothing reached the 500 handler


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, headers=AUTH, timeout=60) as client:
        yield client


def assert_openai_error(response: httpx.Response, status: int, param: str | None = "?") -> dict[str, Any]:
    """The OpenAI error shape with this status (and ``param``, unless "?")."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param != "?":
        assert error["param"] == param, error
    return dict(error)


BOUNDS = [  # (route, fields over the defaults, the param the 400 names)
    ("chat", {"n": 9223372036854775808}, "n"),
    ("chat", {"n": 129, "temperature": 1}, "n"),
    ("chat", {"n": 0}, "n"),
    ("chat", {"max_tokens": 0}, "max_tokens"),
    ("chat", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("chat", {"max_tokens": 10**30}, "max_tokens"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs=true, as vLLM refuses it
    ("text", {"logprobs": 21}, "logprobs"),
    ("text", {"logprobs": -1}, "logprobs"),
    ("text", {"best_of": 0}, "best_of"),
    ("text", {"best_of": 3}, "best_of"),  # best_of > n: not supported
    ("text", {"max_tokens": True}, "max_tokens"),  # strict: a bool is no integer
    ("chat", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("chat", {"stop": "x" * 257}, "stop"),
    ("chat", {"stop": ""}, "stop"),
    ("chat", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("chat", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("chat", {"logit_bias": {"999999999": 1}}, "logit_bias"),  # outside the vocabulary
    ("chat", {"seed": 2**63}, "seed"),
    ("chat", {"seed": 2**53}, "seed"),
    ("chat", {"stop_token_ids": [10**9]}, "stop_token_ids"),
    ("chat", {"stop_token_ids": [-1]}, "stop_token_ids"),
    ("chat", {"temperature": -1}, "temperature"),
    ("text", {"prompt": [-1]}, "prompt"),
    ("text", {"prompt": []}, "prompt"),
    ("text", {"prompt": [5] * 2000}, "prompt"),  # longer than the context
]


@pytest.mark.parametrize(
    ("route", "fields", "param"), BOUNDS, ids=[f"{r}-{p}-{i}" for i, (r, _, p) in enumerate(BOUNDS)]
)
def test_a_field_out_of_bounds_is_a_400_naming_it(
    http: httpx.Client, route: str, fields: dict[str, Any], param: str
) -> None:
    path, base = ("/v1/chat/completions", CHAT) if route == "chat" else ("/v1/completions", TEXT)
    start = time.perf_counter()
    error = assert_openai_error(http.post(path, json={**base, **fields}), 400, param)
    assert time.perf_counter() - start < 5, "refused at once, not after computing"
    assert error["type"] == "invalid_request_error"


MASS = [  # a body just under the limit that is wrong everywhere: one error, not 200,000
    ("text", {"prompt": [-1] * 200_000}, "prompt"),
    ("text", {"stop_token_ids": [True] * 150_000}, "stop_token_ids"),
    ("text", {"logit_bias": {f"x{i}": 1 for i in range(50_000)}}, "logit_bias"),
    ("chat", {"messages": [{"role": "robot"}] * 50_000}, "messages"),
]


@pytest.mark.parametrize(("route", "fields", "param"), MASS, ids=[p for _, _, p in MASS])
def test_a_body_wrong_everywhere_is_refused_as_fast(
    http: httpx.Client, route: str, fields: dict[str, Any], param: str
) -> None:
    path, base = ("/v1/chat/completions", CHAT) if route == "chat" else ("/v1/completions", TEXT)
    body = json.dumps({**base, **fields}).encode()
    assert len(body) < MAX_BODY
    start = time.perf_counter()
    response = http.post(path, content=body, headers=JSON)
    elapsed = time.perf_counter() - start
    assert_openai_error(response, 400, param)
    assert len(response.content) < 2000 and elapsed < 1.5, (elapsed, len(response.content))  # was 2.4 s, idle


def test_prompt_ids_outside_the_vocabulary_and_the_context_are_refused(http: httpx.Client) -> None:
    error = assert_openai_error(http.post("/v1/completions", json={**TEXT, "prompt": [10**9]}), 400)
    assert "vocabulary" in error["message"]
    long = assert_openai_error(http.post("/v1/completions", json={**TEXT, "prompt": [5] * 2000}), 400, "prompt")
    assert long["code"] == "context_length_exceeded"


MALFORMED = {  # name: (path, raw body, content type)
    "lone surrogate in content": (
        "/v1/chat/completions",
        b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
        "application/json",
    ),
    "lone surrogate in prompt": ("/v1/completions", b'{"model": "m", "prompt": "a\\udfffb"}', "application/json"),
    "lone surrogate in model": ("/v1/completions", b'{"model": "\\ud800", "prompt": "a"}', "application/json"),
    "lone surrogate in a part": (
        "/v1/chat/completions",
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
        "application/json",
    ),
    "invalid UTF-8": ("/v1/chat/completions", b'{"model": "\xff\xfe", "messages": []}', "application/json"),
    "deep nesting": ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, "application/json"),
    "truncated JSON": ("/v1/chat/completions", b'{"model": "m", "messages": [', "application/json"),
    "NaN": ("/v1/completions", b'{"model": "m", "prompt": "a", "temperature": NaN}', "application/json"),
    "a JSON array": ("/v1/chat/completions", b"[1, 2]", "application/json"),
    "empty body": ("/v1/chat/completions", b"", "application/json"),
    "text/plain": ("/v1/chat/completions", json.dumps(CHAT).encode(), "text/plain"),
    "no content type": ("/v1/chat/completions", json.dumps(CHAT).encode(), ""),
    "an image part": (
        "/v1/chat/completions",
        json.dumps({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(),
        "application/json",
    ),
    "a wrong role": (
        "/v1/chat/completions",
        json.dumps({**CHAT, "messages": [{"role": "robot", "content": "hi"}]}).encode(),
        "application/json",
    ),
    "a mixed prompt batch": (
        "/v1/completions",
        json.dumps({**TEXT, "prompt": ["a", [5]]}).encode(),
        "application/json",
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_body_gets_an_openai_400(http: httpx.Client, name: str) -> None:
    path, body, content_type = MALFORMED[name]
    headers = {**AUTH, "Content-Type": content_type} if content_type else AUTH
    response = http.post(path, content=body, headers=headers)
    assert_openai_error(response, 400)


def test_unknown_routes_and_methods_get_openai_errors(http: httpx.Client, served: Served) -> None:
    assert_openai_error(http.post("/v1/nothing", json={}), 404)
    assert_openai_error(http.get("/v1/chat/completions"), 405)
    missing = assert_openai_error(http.post("/v1/completions", json={**TEXT, "model": "gpt-nope"}), 404, "model")
    assert missing["code"] == "model_not_found"
    ok = http.post("/v1/chat/completions", json=CHAT)  # still serving after all of the above
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_health_is_open_and_everything_else_needs_the_key(served: Served) -> None:
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"
    for method, path in (("GET", "/stats"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        response = httpx.request(method, f"{served.url}{path}", json=CHAT)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", path
        wrong = httpx.request(method, f"{served.url}{path}", json=CHAT, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401, path
    assert httpx.get(f"{served.url}/stats", headers=AUTH).status_code == 200


def test_a_body_over_the_limit_is_a_413_before_it_is_read(http: httpx.Client) -> None:
    big = json.dumps({**TEXT, "prompt": "a" * MAX_BODY}).encode()
    error = assert_openai_error(http.post("/v1/completions", content=big, headers=JSON), 413)
    assert "max_request_body_bytes" in error["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while read
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    assert_openai_error(http.post("/v1/completions", content=chunked(), headers=JSON), 413)
    just_under = json.dumps({**TEXT, "prompt": [5] * 10}).encode().ljust(MAX_BODY, b" ")
    assert http.post("/v1/completions", content=just_under, headers=JSON).status_code == 200


def latencies_while(served: Served, busy: Any) -> tuple[list[float], list[float]]:
    """Latencies of /health and of a one-token chat, asked again and again while ``busy`` runs."""
    health, chat = [], []
    worker = threading.Thread(target=busy)
    worker.start()
    with httpx.Client(base_url=served.url, headers=AUTH, timeout=30) as client:
        client.get("/health")  # a warm connection: time the server, not the handshake
        while worker.is_alive():
            start = time.perf_counter()
            assert client.get("/health").status_code == 200
            health.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1}).status_code == 200
            chat.append(time.perf_counter() - start)
    worker.join()
    return health, chat


def test_others_are_answered_while_a_huge_body_is_refused_or_a_long_prompt_tokenized(
    served: Served, tmp_path: Path
) -> None:
    huge = b'{"model": "m", "prompt": "' + b"a" * 10_000_000 + b'"}'
    # A legal body (just under the limit) whose prompt takes a second or more to tokenize,
    # then is refused as longer than the context.
    long_text = json.dumps({**TEXT, "prompt": "hello world, the quick brown fox. " * (MAX_BODY // 40)}).encode()
    answers: list[int] = []

    def refuse_huge() -> None:  # with Content-Length, then chunked (read up to the limit)
        with httpx.Client(base_url=served.url, headers=JSON, timeout=60) as client:
            for i in range(6):
                content = huge if i % 2 else iter([huge[j : j + 65536] for j in range(0, len(huge), 65536)])
                answers.append(client.post("/v1/completions", content=content).status_code)

    def tokenize_long() -> None:
        with httpx.Client(base_url=served.url, headers=JSON, timeout=60) as client:
            for _ in range(3):
                answers.append(client.post("/v1/completions", content=long_text).status_code)

    for busy in (refuse_huge, tokenize_long):
        health, chat = latencies_while(served, busy)
        assert health, "the busy requests ended before anything was measured"
        print(busy.__name__, [round(x * 1000) for x in health], [round(x * 1000) for x in chat])
        assert max(health) < 0.1 and sorted(chat)[len(chat) // 2] < 0.1, (busy.__name__, health, chat)
    assert answers == [413] * 6 + [400] * 3


def test_a_non_streaming_request_is_aborted_when_its_client_leaves(served: Served) -> None:
    def engine() -> dict[str, Any]:
        return dict(httpx.get(f"{served.url}/stats", headers=AUTH).json())

    def idle() -> bool:
        s = engine()
        return s["num_requests_running"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]

    assert wait_until(idle, 30), engine()
    steps_before = engine()["num_steps"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            f"{served.url}/v1/chat/completions",
            json={**CHAT, "max_tokens": 480, "ignore_eos": True},  # ~2 s here, alone
            headers=AUTH,
            timeout=0.5,
        )
    assert wait_until(idle, 10), engine()
    assert engine()["num_steps"] - steps_before < 480, "aborted, not run to its 480 tokens (a step each)"


def test_the_openapi_schema_documents_the_errors_and_the_bounds(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert sorted(responses) == ["200", "400", "401", "404", "413", "429", "503"], path
        for status in ("400", "401", "404", "413", "429", "503"):
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorResponse", (path, status)
    models = schema["components"]["schemas"]
    chat, text = models["ChatCompletionRequest"]["properties"], models["CompletionRequest"]["properties"]
    assert (chat["n"]["minimum"], chat["n"]["maximum"]) == (1, 128)
    assert chat["max_tokens"]["anyOf"][0]["minimum"] == 1 and text["max_tokens"]["anyOf"][0]["minimum"] == 1
    assert chat["top_logprobs"]["anyOf"][0]["maximum"] == 20 and text["logprobs"]["anyOf"][0]["maximum"] == 20
    assert chat["seed"]["anyOf"][0]["maximum"] == 2**53 - 1
    assert chat["stop"]["anyOf"][1]["maxItems"] == 4
    bias = chat["logit_bias"]["anyOf"][0]
    assert list(bias["patternProperties"].values()) == [{"type": "number", "minimum": -100, "maximum": 100}]
    assert bias["additionalProperties"] is False
    assert chat["model"]["enum"] == [EMBEDDED_MODEL_NAME]


@pytest.mark.parametrize("field", ["max_request_body_bytes", "max_queued_requests"])
def test_the_limits_are_config_fields_checked_at_start(field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        PipelineConfig.from_dict({field: 0})
    assert PipelineConfig.from_cli([f"--{field.replace('_', '-')}", "7"]).frontend_limits()[field] == 7
