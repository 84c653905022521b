"""The OpenAI API served by real processes, driven by the official ``openai`` client.

Every test runs twice: against ``python -m modkit.frontend`` (the engine in the server's
process) and against ``scripts/start_all.py`` (the six-process pipeline over ZeroMQ).
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from openai._constants import DEFAULT_CONNECTION_LIMITS

from modkit import LLM, SamplingParams
from modkit.frontend import EMBEDDED_MODEL_NAME

pytestmark = pytest.mark.slow  # every test talks to a server process: the engine's, then the pipeline's

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SERVER_FLAGS = ["--api-key", KEY, "--num-kv-blocks", "512", "--max-model-len", "512"]
COMPONENT_PORTS = ["frontend", "scheduler", "worker", "router", "kv_cache_manager", "sampler"]


@dataclass
class Served:
    """A running OpenAI server: the engine in its process, or the six-process pipeline."""

    kind: str
    url: str
    ports: dict[str, int]
    proc: subprocess.Popen[bytes]
    log: Path


def start(kind: str, log: Path, extra: list[str] = ()) -> Served:  # type: ignore[assignment]
    """``python -m modkit.frontend`` (in-process engine) or ``scripts/start_all.py`` (pipeline) on free ports."""
    ports = {name: free_port() for name in COMPONENT_PORTS}
    if kind == "in_process":
        command = [sys.executable, "-m", "modkit.frontend", "--frontend-port", str(ports["frontend"])]
    else:
        command = [sys.executable, str(ROOT / "scripts" / "start_all.py")]
        command += [a for name, port in ports.items() for a in (f"--{name.replace('_', '-')}-port", str(port))]
    with open(log, "w") as out:
        proc = subprocess.Popen([*command, *SERVER_FLAGS, *extra], stdout=out, stderr=subprocess.STDOUT)
    served = Served(kind, f"http://127.0.0.1:{ports['frontend']}", ports, proc, log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{served.url}/health", headers=AUTH, timeout=1).status_code == 200:
                return served
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, log.read_text()
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"server did not become healthy:\n{log.read_text()}")


@pytest.fixture(scope="module", params=["in_process", "pipeline"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    log = tmp_path_factory.mktemp(request.param) / "server.log"
    served = start(request.param, log)
    yield served
    served.proc.terminate()
    served.proc.wait(timeout=60)


@pytest.fixture
def server(served: Served) -> str:
    return served.url


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def engine_state(served: Served) -> dict[str, float]:
    """Requests running, steps taken and KV blocks, from ``/stats`` of whichever process holds them."""
    if served.kind == "in_process":
        return httpx.get(f"{served.url}/stats", headers=AUTH).json()
    scheduler = httpx.get(f"http://127.0.0.1:{served.ports['scheduler']}/stats", headers=AUTH).json()
    kv = httpx.get(f"http://127.0.0.1:{served.ports['kv_cache_manager']}/stats", headers=AUTH).json()["pools"][0]
    return {
        "num_requests_running": scheduler["num_requests_running"],
        "num_steps": sum(w["num_steps"] for w in scheduler["workers"]),
        "kv_blocks_free": kv["kv_blocks_free"],
        "kv_blocks_total": kv["kv_blocks_total"],
    }


HELLO = [{"role": "user", "content": "Hello!"}]


def test_health_and_models(server: str, client: openai.OpenAI) -> None:
    health = httpx.get(f"{server}/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert health["status"] == "ok" and health["component"] == "frontend"
    assert [m.id for m in client.models.list().data] == [EMBEDDED_MODEL_NAME]


def test_chat_and_completion(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=EMBEDDED_MODEL_NAME, messages=HELLO, temperature=0)  # type: ignore[arg-type]
    choice = chat.choices[0]
    assert choice.message.content.startswith("Hello") and choice.finish_reason == "stop"  # type: ignore[union-attr]
    assert chat.usage is not None and chat.usage.completion_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    text = client.completions.create(model=EMBEDDED_MODEL_NAME, prompt="The dog", max_tokens=5, temperature=0)
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 5  # type: ignore[union-attr]


def test_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me a story about a fox."}]
    whole = client.chat.completions.create(
        model=EMBEDDED_MODEL_NAME,
        messages=messages,
        temperature=0,  # type: ignore[arg-type]
        max_tokens=40,
    )
    chunks = list(
        client.chat.completions.create(
            model=EMBEDDED_MODEL_NAME,
            messages=messages,
            temperature=0,  # type: ignore[arg-type]
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_n_seed_stop_and_logprobs(client: openai.OpenAI) -> None:
    args = dict(model=EMBEDDED_MODEL_NAME, messages=[{"role": "user", "content": "What does a cow say?"}])
    a = client.chat.completions.create(**args, n=3, seed=11, temperature=1.0, max_tokens=12)  # type: ignore[call-overload]
    b = client.chat.completions.create(**args, n=3, seed=11, temperature=1.0, max_tokens=12)  # type: ignore[call-overload]
    assert len(a.choices) == 3 and [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    cut = client.chat.completions.create(**args, temperature=0, stop=["moo"])  # type: ignore[call-overload]
    assert cut.choices[0].message.content == "A cow says " and cut.choices[0].finish_reason == "stop"
    lp = client.chat.completions.create(**args, temperature=0, logprobs=True, top_logprobs=2)  # type: ignore[call-overload]
    content = lp.choices[0].logprobs.content
    assert "".join(t.token for t in content).startswith("A cow says moo")
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server: str, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=EMBEDDED_MODEL_NAME, messages=HELLO, temperature=-1)  # type: ignore[arg-type]
    assert bad.value.status_code == 400 and bad.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-nope", messages=HELLO)  # type: ignore[arg-type]
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=EMBEDDED_MODEL_NAME, prompt=[5] * 600)
    assert long.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=EMBEDDED_MODEL_NAME, messages=[])  # type: ignore[arg-type]
    malformed = httpx.post(
        f"{server}/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
    no_key = httpx.post(f"{server}/v1/chat/completions", json={"model": EMBEDDED_MODEL_NAME, "messages": HELLO})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/health").status_code == 200  # open: a probe carries no key
    assert httpx.get(f"{server}/stats").status_code == 401  # every other route is protected
    ok = client.chat.completions.create(model=EMBEDDED_MODEL_NAME, messages=HELLO, temperature=0)  # type: ignore[arg-type]
    assert ok.choices[0].message.content.startswith("Hello")  # type: ignore[union-attr]


def test_concurrent_streams_equal_the_in_process_engine(client: openai.OpenAI, tiny_model_dir: Path) -> None:
    questions = [
        "Hello!",
        "What does a cow say?",
        "Who are you?",
        "What color is the sky?",
        "What is 2 plus 3?",
        "What does a dog say?",
        "Good morning!",
        "Tell me a story about a cat.",
    ]
    conversations = [[{"role": "user", "content": questions[i % 8]}] for i in range(32)]

    def stream(messages: list[dict[str, str]]) -> str:
        chunks = client.chat.completions.create(
            model=EMBEDDED_MODEL_NAME,
            messages=messages,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=24,
            stream=True,
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    with ThreadPoolExecutor(32) as pool:
        served = list(pool.map(stream, conversations))
    expected = LLM(num_kv_blocks=512).chat(conversations, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert served == [o.outputs[0].text for o in expected]


def test_an_idle_connection_stays_open_longer_than_the_openai_client_keeps_it(server: str) -> None:
    """The openai client reuses a pooled connection idle for up to ``keepalive_expiry``; a server that
    closed it first would fail the next request on it with a connection error, at random."""
    expiry = DEFAULT_CONNECTION_LIMITS.keepalive_expiry
    assert expiry is not None
    connection = http.client.HTTPConnection(server.removeprefix("http://"), timeout=30)
    try:
        connection.request("GET", "/health", headers=AUTH)
        assert connection.getresponse().read() and connection.sock is not None
        # The server closing its end makes the socket readable (end of file): wait for that, or the expiry.
        readable, _, _ = select.select([connection.sock], [], [], expiry + 1.0)
        assert not readable, f"the server closed an idle connection within {expiry + 1.0} s"
        connection.request("GET", "/health", headers=AUTH)  # on the same connection
        assert connection.getresponse().status == 200
    finally:
        connection.close()


def test_a_client_that_disconnects_frees_its_blocks(served: Served, server: str) -> None:
    body = {"model": EMBEDDED_MODEL_NAME, "messages": HELLO, "max_tokens": 480, "ignore_eos": True, "stream": True}
    steps_before = engine_state(served)["num_steps"]
    with httpx.stream(
        "POST", f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as response:
        lines = response.iter_lines()
        first = [json.loads(line[6:]) for line in (next(lines), next(lines), next(lines)) if line.startswith("data: ")]
        assert first
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = engine_state(served)
        if s["num_requests_running"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]:
            # Aborted, not run to its 480 tokens: run to the end, it would have taken a step per
            # token. (How many steps the abort takes to arrive depends on the machine's load.)
            assert s["num_steps"] - steps_before < 480, s
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the aborted request still holds blocks: {engine_state(served)}")
