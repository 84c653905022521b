"""vLLM's extra endpoints, and ``/metrics`` with vLLM's metric names, types and buckets.

- ``/tokenize`` takes a ``prompt`` or chat ``messages`` and answers ``tokens``, ``count`` and
  ``max_model_len``; ``/detokenize`` takes ``tokens`` and answers ``prompt`` (vLLM's shapes).
  The oracle: the tokenizer itself, and the prompt lengths the completions report.
- ``/version``; ``/v1/models/{id}`` is OpenAI's "retrieve model" (vLLM has only the list).
- ``/metrics``: the metrics vLLM 0.32 defines in ``vllm/v1/metrics/loggers.py`` (checked
  against that file's buckets where vLLM is installed), counting what the responses say
  was served. Each app has its own registry: two apps in one process count apart.
- The pipeline: the frontend's ``/metrics`` reads the scheduler and the KV cache manager;
  every component's port serves its ``/stats`` as ``/metrics``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from waiting import wait_until

import modkit
from modkit import Pipeline
from modkit.engine.async_engine import AsyncEngine
from modkit.engine.config import EngineConfig
from modkit.frontend import EMBEDDED_MODEL_NAME
from modkit.frontend.app import build_app
from modkit.frontend.metrics import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS

HELLO = [{"role": "user", "content": "Hello!"}]
TYPES = {  # vLLM's metrics and their Prometheus types
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
}


@pytest.fixture(scope="module")
def engine() -> Iterator[AsyncEngine]:
    engine = AsyncEngine(EngineConfig(num_kv_blocks=128))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def http(engine: AsyncEngine) -> Iterator[TestClient]:
    with TestClient(build_app(engine, EMBEDDED_MODEL_NAME)) as client:
        yield client


def scrape(text: str) -> dict[str, Any]:
    """{family name: family} from Prometheus text (the parser checks the format)."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], name: str, suffix: str = "", **labels: str) -> float:
    """The value of one sample of family ``name`` (``suffix``: ``_total``, ``_count``, ...)."""
    family = families[name]
    found = [s.value for s in family.samples if s.name == name + suffix and labels.items() <= s.labels.items()]
    assert len(found) == 1, (name, suffix, labels, family.samples)
    return float(found[0])


def test_tokenize_a_prompt_as_the_tokenizer_does(http: TestClient, engine: AsyncEngine) -> None:
    text = "The dog ran to the park."
    body = http.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    ids = engine.tokenizer.encode(text)
    assert body == {
        "count": len(ids),
        "max_model_len": engine.max_model_len,
        "tokens": ids,
        "token_strs": engine.tokenizer.convert_ids_to_tokens(ids),
    }
    served = http.post("/v1/completions", json={"prompt": text, "max_tokens": 1}).json()
    assert served["usage"]["prompt_tokens"] == body["count"]


def test_tokenize_messages_as_the_chat_completion_does(http: TestClient, engine: AsyncEngine) -> None:
    body = http.post("/tokenize", json={"model": EMBEDDED_MODEL_NAME, "messages": HELLO}).json()
    expected = engine.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    assert body["tokens"] == engine.tokenizer.encode(expected, add_special_tokens=False)
    assert body["token_strs"] is None
    served = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1}).json()
    assert served["usage"]["prompt_tokens"] == body["count"] == len(body["tokens"])
    bare = http.post("/tokenize", json={"messages": HELLO, "add_generation_prompt": False}).json()
    assert bare["count"] < body["count"] and body["tokens"][: bare["count"]] == bare["tokens"]


def test_detokenize_inverts_tokenize(http: TestClient) -> None:
    text = "Hello! The cat sat on the mat."
    tokens = http.post("/tokenize", json={"prompt": text}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": tokens}).json() == {"prompt": text}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/detokenize", {"tokens": [10**9]}, "tokens"),  # outside the vocabulary
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/tokenize", {"prompt": "a", "messages": HELLO}, None),  # one or the other
        ("/tokenize", {}, None),
        ("/tokenize", {"prompt": "a", "truncate_prompt_tokens": 3}, "truncate_prompt_tokens"),  # not implemented
        ("/tokenize", {"prompt": "a", "model": "gpt-nope"}, "model"),
    ],
)
def test_bad_tokenize_requests_are_openai_errors(
    http: TestClient, path: str, body: dict[str, Any], param: str | None
) -> None:
    response = http.post(path, json=body)
    assert response.status_code == (404 if param == "model" else 400), response.text
    assert response.json()["error"]["param"] == param


def test_tokenizer_info_lets_a_client_tokenize_through_the_server(http: TestClient, engine: AsyncEngine) -> None:
    """What lm-eval's API models read to go without a tokenizer of their own: the special tokens,
    and a chat template that renders as the server's own (they then tokenize via /tokenize)."""
    import jinja2

    info = http.get("/tokenizer_info").json()
    tokenizer = engine.tokenizer
    assert info["tokenizer_class"] == type(tokenizer).__name__
    assert info["eos_token"] == tokenizer.eos_token
    paths = [key for key in info if key.endswith("_file") or key == "name_or_path"]
    assert not paths, "no path of the server's disk"
    messages = [{"role": "user", "content": "What does a cow say?"}]
    rendered = (
        jinja2.Environment()
        .from_string(info["chat_template"])
        .render(messages=messages, add_generation_prompt=True, eos_token=info["eos_token"], bos_token=info["bos_token"])
    )
    assert rendered == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    eos = http.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
    assert eos == [tokenizer.eos_token_id]


def test_tokenizer_info_has_what_vllms_has(http: TestClient, engine: AsyncEngine) -> None:
    pytest.importorskip("vllm", reason="vLLM's own TokenizerInfo is the oracle")
    from vllm.entrypoints.serve.tokenize.serving import TokenizerInfo

    tokenizer = engine.tokenizer
    expected = json.loads(json.dumps(TokenizerInfo(tokenizer, tokenizer.chat_template).to_dict(), default=repr))
    info = http.get("/tokenizer_info").json()
    del expected["name_or_path"]  # where the server loaded it from: modkit does not say
    assert {k: info.get(k) for k in expected} == expected


def test_version_and_one_model(http: TestClient) -> None:
    assert http.get("/version").json() == {"version": modkit.__version__}
    card = http.get(f"/v1/models/{EMBEDDED_MODEL_NAME}").json()  # the name has a slash: modkit/tiny-chat
    assert card == http.get("/v1/models").json()["data"][0]
    missing = http.get("/v1/models/gpt-nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_metrics_have_vllms_names_types_and_labels(http: TestClient) -> None:
    response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    families = scrape(response.text)
    for name, kind in TYPES.items():
        assert families[name].type == kind, name
        labels = {s.labels.get("model_name") for s in families[name].samples}
        assert labels == {EMBEDDED_MODEL_NAME}, (name, labels)
    assert families["vllm:num_requests_running"].samples[0].labels["engine"] == "0"
    buckets = [float(s.labels["le"]) for s in families["vllm:time_to_first_token_seconds"].samples if "le" in s.labels]
    assert buckets[:-1] == TTFT_BUCKETS


def test_metrics_count_what_was_served(http: TestClient) -> None:
    before = scrape(http.get("/metrics").text)
    bodies = [
        {"prompt": "The dog", "max_tokens": 7, "ignore_eos": True, "n": 2},
        {"prompt": "The cat sat", "max_tokens": 5, "ignore_eos": True, "stream": True},
        {"messages": HELLO, "max_tokens": 4, "ignore_eos": True},
    ]
    prompt_tokens = completion_tokens = completions = 0
    for body in bodies:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        if body.get("stream"):
            tokens = http.post("/tokenize", json={"prompt": body["prompt"]}).json()["count"]
            assert http.post(path, json=body).status_code == 200
            prompt_tokens, completion_tokens = prompt_tokens + tokens, completion_tokens + body["max_tokens"]
        else:
            usage = http.post(path, json=body).json()["usage"]
            prompt_tokens += usage["prompt_tokens"] * body.get("n", 1)  # vLLM counts each of n as a request
            completion_tokens += usage["completion_tokens"]
        completions += body.get("n", 1)
    after = scrape(http.get("/metrics").text)

    def grew(name: str, suffix: str) -> float:
        return sample(after, name, suffix) - sample(before, name, suffix)

    assert grew("vllm:prompt_tokens", "_total") == prompt_tokens
    assert grew("vllm:generation_tokens", "_total") == completion_tokens
    assert grew("vllm:time_to_first_token_seconds", "_count") == completions
    assert grew("vllm:e2e_request_latency_seconds", "_count") == completions
    # One token a step here (no speculative decoding): an interval between each two.
    assert grew("vllm:inter_token_latency_seconds", "_count") == completion_tokens - completions
    assert grew("vllm:prefix_cache_queries", "_total") > 0
    assert sample(after, "vllm:num_requests_running") == 0


def test_two_apps_in_one_process_count_apart(http: TestClient, engine: AsyncEngine) -> None:
    with TestClient(build_app(engine, EMBEDDED_MODEL_NAME)) as other:
        first = scrape(other.get("/metrics").text)
        assert http.post("/v1/completions", json={"prompt": "The dog", "max_tokens": 3}).status_code == 200
        assert (
            scrape(other.get("/metrics").text)["vllm:generation_tokens"].samples
            == first["vllm:generation_tokens"].samples
        )
        assert other.post("/v1/completions", json={"prompt": "The dog", "max_tokens": 3}).status_code == 200
        assert sample(scrape(other.get("/metrics").text), "vllm:generation_tokens", "_total") == 3


def test_names_and_types_are_vllms() -> None:
    """Read from vLLM's ``loggers.py``: each name and the class that makes it (``_gauge_cls`` ...)."""
    loggers = pytest.importorskip("vllm.v1.metrics.loggers")
    source = Path(loggers.__file__).read_text()
    defined = dict(
        (m[1], m[0]) for m in re.findall(r"self\._(gauge|counter|histogram)_cls\(\s*name=\"(vllm:\w+)\"", source)
    )
    assert {name: defined.get(name) for name in TYPES} == TYPES


def test_buckets_are_vllms() -> None:
    buckets = pytest.importorskip("vllm.v1.metrics.buckets")
    assert buckets.histogram_buckets("time_to_first_token") == TTFT_BUCKETS
    assert buckets.histogram_buckets("inter_token_latency") == ITL_BUCKETS
    assert buckets.histogram_buckets("request_latency") == E2E_BUCKETS


# -- the pipeline ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline() -> Iterator[Pipeline]:
    with Pipeline.launch(ports="auto", num_kv_blocks=256, max_model_len=512, progress=False) as p:
        yield p


@pytest.mark.slow
def test_pipeline_metrics_read_the_scheduler_and_the_kv_cache(pipeline: Pipeline) -> None:
    url = pipeline.url
    body = {"model": pipeline.model_name, "prompt": "The dog", "max_tokens": 400, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=120)

        def one_running() -> bool:
            return sample(scrape(httpx.get(f"{url}/metrics").text), "vllm:num_requests_running", engine="0") == 1

        assert wait_until(one_running, 30), httpx.get(f"{url}/metrics").text
        usage = sample(scrape(httpx.get(f"{url}/metrics").text), "vllm:kv_cache_usage_perc", engine="0")
        assert 0 < usage < 1
        assert running.result().status_code == 200
    families = scrape(httpx.get(f"{url}/metrics").text)
    assert sample(families, "vllm:generation_tokens", "_total") == 400
    assert sample(families, "vllm:num_requests_running", engine="0") == 0
    assert sample(families, "vllm:prefix_cache_queries", "_total", engine="0") >= 2
    assert sample(families, "modkit_num_finished", component="frontend") == 1  # the frontend's own /stats


STILL = {  # per component, a /stats number that an idle pipeline does not change between two reads
    "frontend": "num_finished",
    "scheduler": "num_rejected",
    "worker-0": "num_failed_steps",
    "router": "kv_events_missed",
    "kv_cache_manager": "num_kv_events",
    "sampler": "num_tokens_sampled",
}


@pytest.mark.slow
def test_every_component_port_serves_its_stats_as_metrics(pipeline: Pipeline) -> None:
    assert set(pipeline.urls()) == set(STILL)
    for name, health in pipeline.urls().items():
        base = health.removesuffix("/health")
        stats = httpx.get(f"{base}/stats").json()
        families = scrape(httpx.get(f"{base}/metrics").text)
        numbers = [k for k, v in stats.items() if isinstance(v, int | float)]
        assert numbers and all(f"modkit_{k}" in families for k in numbers), (name, numbers, list(families))
        assert sample(families, f"modkit_{STILL[name]}", component=name) == stats[STILL[name]], name
    scheduler = scrape(httpx.get(pipeline.urls()["scheduler"].removesuffix("/health") + "/metrics").text)
    assert sample(scheduler, "modkit_workers_num_steps", worker="0") > 0


def test_the_grafana_dashboard_queries_metrics_the_frontend_serves() -> None:
    dashboard = json.loads((Path(__file__).parents[1] / "deploy" / "grafana" / "modkit-vllm.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    names = {re.sub(r"_(bucket|total)$", "", n) for e in exprs for n in re.findall(r"vllm:\w+", e)}
    assert names == set(TYPES)
