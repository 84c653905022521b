"""Swapping parts of a running pipeline (scheduling, eviction and routing policies, the sampler,
the attention backend): by name, by import path, and a class sent by value (signed); nothing
lost, greedy outputs unchanged, bad code refused or rolled back.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from test_pipeline import free_ports

from modkit import LLM, Pipeline, SamplingParams
from modkit.attention.torch_ref import TorchReferenceAttention
from modkit.kvcache import KVCacheBlock, KVCacheManager, LRUEviction
from modkit.kvcache.hashing import BlockHash
from modkit.request import Request
from modkit.router.policies import RouterPolicy, WorkerView
from modkit.sampler import Sampler, SamplerOutput, SamplingState, get_sampler
from modkit.scheduler import Scheduler
from modkit.scheduler.policies import SchedulingPolicy, ShortestJobFirstPolicy
from modkit.swap import ImplSpec, SignatureError, SignedCode, load_signed, new_key, sign
from modkit.transport import RemoteError

QUESTIONS = [f"Tell me about the number {i}." for i in range(8)]


class Marker:
    """Unpickling this writes a file: proof that a payload was (or was not) loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_signed_code_loads_only_under_its_own_key(tmp_path: Path) -> None:
    key = new_key()
    assert load_signed(sign(ShortestJobFirstPolicy, key), key) is ShortestJobFirstPolicy
    marker = tmp_path / "loaded"
    payload = pickle.dumps(Marker(str(marker)))
    good = SignedCode(payload, sign(None, key).signature)  # a signature of other bytes
    forged = [
        good,
        SignedCode(payload + b" ", sign(payload, key).signature),
        SignedCode(payload, "00" * 32),
        SignedCode(payload, sign(Marker(str(marker)), new_key()).signature),
    ]
    for code in forged:
        with pytest.raises(SignatureError):
            load_signed(code, key)
    with pytest.raises(SignatureError, match="holds no signing key"):
        load_signed(sign(Marker(str(marker)), key), None)
    assert not marker.exists(), "a refused payload was unpickled"


def make_request(req_id: str, num_tokens: int, arrival: float) -> Request:
    return Request(req_id, list(range(1, num_tokens + 1)), SamplingParams(max_tokens=4), arrival_time=arrival)


def test_sjf_admits_short_prompts_first_but_not_forever() -> None:
    scheduler = Scheduler(KVCacheManager(64, 16), max_num_batched_tokens=40, policy="sjf")
    now = time.time()
    for req_id, n in [("long", 30), ("short", 5), ("mid", 12)]:
        scheduler.add_request(make_request(req_id, n, now))
    first = scheduler.schedule()
    assert list(first.num_scheduled_tokens) == ["short", "mid", "long"]  # the long one gets what is left
    assert first.num_scheduled_tokens["long"] == 40 - 5 - 12
    # A request that has waited max_wait_s goes ahead of shorter ones that have not.
    starved = Scheduler(KVCacheManager(64, 16), max_num_batched_tokens=20, policy="sjf")
    starved.add_request(make_request("old-long", 18, now - ShortestJobFirstPolicy.max_wait_s - 1))
    starved.add_request(make_request("new-short", 3, now))
    assert list(starved.schedule().num_scheduled_tokens) == ["old-long", "new-short"]


@pytest.fixture(scope="module")
def pipeline() -> Iterator[Pipeline]:
    with Pipeline.launch(
        num_workers=2, num_kv_blocks=48, max_num_batched_tokens=64, progress=False, **free_ports()
    ) as p:
        yield p


def run_all(p: Pipeline, during: Any = None) -> list[str]:
    """Every question at once, greedy; ``during()`` runs while they are in flight."""
    client = p.client(timeout=120)

    def ask(question: str) -> str:
        reply = client.chat.completions.create(
            model=p.model_name, messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0
        )
        return str(reply.choices[0].message.content)

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        futures = [pool.submit(ask, q) for q in QUESTIONS]
        if during is not None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until most requests reached the scheduler
                scheduler = p.stats()["scheduler"]
                if scheduler["num_requests_running"] + scheduler["num_requests_waiting"] >= len(QUESTIONS) // 2:
                    break
                time.sleep(0.01)
            during()
        return [f.result() for f in futures]


@pytest.fixture(scope="module")
def expected() -> list[str]:
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outs = LLM(num_kv_blocks=48, max_num_batched_tokens=64).chat(
        conversations, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False
    )
    return [o.outputs[0].text for o in outs]


@pytest.mark.slow
def test_swaps_by_name_and_import_path_while_requests_run(pipeline: Pipeline, expected: list[str]) -> None:
    pipeline.clear_trace()
    answers = run_all(pipeline, during=lambda: pipeline.swap("scheduler", "sjf"))
    assert answers == expected, "requests in flight finished as they would have without a swap"
    assert pipeline.health()["scheduler"]["implementation"] == "sjf"
    swapped = pipeline.swap("scheduler", "modkit.scheduler.policies:FCFSPolicy")
    assert swapped == {"implementation": "modkit.scheduler.policies:FCFSPolicy", "previous": "sjf"}
    trace = pipeline.trace()
    swaps = trace.swaps
    assert list(swaps.implementation) == ["sjf", "modkit.scheduler.policies:FCFSPolicy"] and swaps.error.isna().all()
    in_flight = (trace.requests.arrival < swaps.t.iloc[0]) & (swaps.t.iloc[0] < trace.requests.finished)
    assert in_flight.sum() >= len(QUESTIONS) // 2, "swapped while requests ran"


@pytest.mark.slow
def test_a_class_from_a_cell_is_sent_signed_and_runs_there(pipeline: Pipeline, expected: list[str]) -> None:
    class LastComeFirstServed(SchedulingPolicy):  # local: cloudpickle sends it by value
        def admission_key(self, request: Request) -> tuple[float, ...]:
            return (-request.arrival_time,)

        def pick_victim(self, running: list[Request]) -> Request:
            return min(running, key=lambda r: r.arrival_time)

    assert pipeline.swap("scheduler", LastComeFirstServed)["implementation"].endswith("LastComeFirstServed")
    assert run_all(pipeline) == expected
    assert pipeline.health()["scheduler"]["implementation"].endswith("LastComeFirstServed")


@pytest.mark.slow
def test_tampered_or_foreign_code_is_refused_unread(pipeline: Pipeline, tmp_path: Path) -> None:
    marker = tmp_path / "loaded"
    before = pipeline.health()["scheduler"]["implementation"]
    for key in (new_key(), pipeline.swap_key):
        code = sign(Marker(str(marker)), key)
        if key == pipeline.swap_key:
            code = SignedCode(code.pickled + b".", code.signature)  # changed after signing
        with pipeline.processes["scheduler"].client() as rpc, pytest.raises(RemoteError) as refused:
            rpc.call("swap", ImplSpec(code=code))
        assert refused.value.type_name == "SignatureError"
    assert not marker.exists()
    assert pipeline.health()["scheduler"]["implementation"] == before
    with pytest.raises(ValueError, match="cannot be swapped"):
        pipeline.swap("frontend", "sjf")
    with pipeline.processes["router"].client() as rpc, pytest.raises(RemoteError) as refused:
        rpc.call("swap", ImplSpec(code=sign(Marker(str(marker)), new_key())))
    assert refused.value.type_name == "SignatureError" and not marker.exists()


@pytest.mark.slow
def test_a_policy_that_raises_is_refused_or_rolled_back_and_serving_goes_on(
    pipeline: Pipeline, expected: list[str]
) -> None:
    pipeline.swap("scheduler", "fcfs")

    class Broken(SchedulingPolicy):
        def admission_key(self, request: Request) -> tuple[float, ...]:
            return (request.arrival_time,)

        def pick_victim(self, running: list[Request]) -> Request:
            raise RuntimeError("no victim for you")

    # Tried on the running requests before it takes over: refused at once, the caller sees why.
    with pytest.raises(RemoteError, match="no victim for you") as refused:
        run_all(pipeline, during=lambda: pipeline.swap("scheduler", Broken))
    assert refused.value.type_name == "RuntimeError" and "pick_victim" in refused.value.remote_traceback
    assert pipeline.health()["scheduler"]["implementation"] == "fcfs"

    class BreaksLater(SchedulingPolicy):  # fine on an empty queue, fails on the first request it orders
        def admission_key(self, request: Request) -> tuple[float, ...]:
            raise RuntimeError(f"cannot order {request.req_id}")

        def pick_victim(self, running: list[Request]) -> Request:
            return running[0]

    pipeline.clear_trace()
    pipeline.swap("scheduler", BreaksLater)
    assert run_all(pipeline) == expected, "the step it failed in used the old policy; nothing was lost"
    health = pipeline.health()["scheduler"]
    assert health["implementation"] == "fcfs" and "cannot order" in health["last_swap_error"]
    swaps = pipeline.trace().swaps
    assert list(swaps.implementation)[-1] == "fcfs" and "cannot order" in swaps.error.iloc[-1]


@pytest.mark.slow
def test_the_routing_policy_swaps_too_and_a_failing_one_is_rolled_back(pipeline: Pipeline, expected: list[str]) -> None:
    class AlwaysTheLast(RouterPolicy):
        def choose(self, block_hashes: list[BlockHash], num_prompt_blocks: int, workers: list[WorkerView]) -> int:
            return max(w.worker_id for w in workers)

    pipeline.clear_trace()
    swapped: dict[str, Any] = {}
    assert run_all(pipeline, during=lambda: swapped.update(pipeline.swap("router", AlwaysTheLast))) == expected
    assert swapped["previous"] == "round_robin"
    trace = pipeline.trace()
    assert (trace.routes.worker_id[trace.routes.t > trace.swaps.t.iloc[0]] == 1).all()
    pipeline.clear_trace()
    assert run_all(pipeline) == expected
    routes = pipeline.trace().routes
    assert len(routes) == len(QUESTIONS) and (routes.worker_id == 1).all()

    class LosesTheMap(RouterPolicy):
        def choose(self, block_hashes: list[BlockHash], num_prompt_blocks: int, workers: list[WorkerView]) -> int:
            if not block_hashes:  # the dry run, on an empty prompt
                return workers[0].worker_id
            raise RuntimeError("lost the map")

    pipeline.clear_trace()
    pipeline.swap("router", LosesTheMap)
    assert run_all(pipeline) == expected, "the request it failed on was routed by the policy before it"
    health = pipeline.health()["router"]
    assert health["implementation"].endswith("AlwaysTheLast") and "lost the map" in health["last_swap_error"]
    trace = pipeline.trace()
    assert (trace.routes.worker_id == 1).all()
    assert list(trace.swaps.component) == ["router", "router"] and "lost the map" in trace.swaps.error.iloc[-1]
    pipeline.swap("router", "round_robin")  # the tests below need both workers to step


def check_pools(p: Pipeline) -> None:
    with p.processes["kv_cache_manager"].client() as rpc:
        for pool in range(p.config.num_workers):
            rpc.call("check_invariants", pool)


@pytest.mark.slow
def test_the_eviction_policy_swaps_while_requests_run(pipeline: Pipeline, expected: list[str]) -> None:
    pipeline.clear_trace()
    answers = run_all(pipeline, during=lambda: pipeline.swap("kv_cache_manager", "lfu"))
    assert answers == expected
    check_pools(pipeline)
    health = pipeline.health()["kv_cache_manager"]
    assert health["eviction_policy"] == "lfu" and health["last_swap_error"] is None
    swaps = pipeline.trace().swaps
    assert list(swaps.component) == ["kv_cache_manager"] and list(swaps.previous) == ["lru"]
    assert run_all(pipeline) == expected
    pipeline.swap("kv_cache_manager", "modkit.kvcache.eviction:LRUEviction")
    check_pools(pipeline)


@pytest.mark.slow
def test_an_eviction_policy_that_raises_later_is_rolled_back(pipeline: Pipeline, expected: list[str]) -> None:
    class GivesUp(LRUEviction):  # its first instance (the swap's trial) works; the pools' ones fail
        instances = 0

        def __init__(self) -> None:
            super().__init__()
            type(self).instances += 1
            self.works = type(self).instances == 1

        def pop(self) -> KVCacheBlock:
            if not self.works:
                raise RuntimeError("too many pops")
            return super().pop()

    pipeline.swap("kv_cache_manager", "lru")
    pipeline.clear_trace()
    assert pipeline.swap("kv_cache_manager", GivesUp)["implementation"].endswith("GivesUp")
    assert run_all(pipeline) == expected, "the allocation it failed on was served by LRU"
    check_pools(pipeline)
    health = pipeline.health()["kv_cache_manager"]
    assert health["eviction_policy"] == "lru" and "too many pops" in health["last_swap_error"]
    swaps = pipeline.trace().swaps
    assert list(swaps.implementation) == [swaps.implementation.iloc[0], "lru"]
    assert "too many pops" in swaps.error.iloc[-1]


@pytest.mark.slow
def test_the_sampler_swaps_on_every_worker_while_requests_run(pipeline: Pipeline, expected: list[str]) -> None:
    pipeline.clear_trace()
    assert run_all(pipeline, during=lambda: pipeline.swap("sampler", "per_request")) == expected
    health = pipeline.health()
    assert health["sampler"]["implementation"] == "per_request"
    assert health["worker-0"]["sampler"] == health["worker-1"]["sampler"] == "per_request"
    swaps = pipeline.trace().swaps
    assert list(swaps.component) == ["sampler"] and list(swaps.previous) == ["default"]

    class WrongShape(Sampler):
        def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
            return SamplerOutput(torch.zeros(1, dtype=torch.int64), None, [None])

    with pytest.raises(RemoteError, match="token ids for 5 rows"):
        pipeline.swap("sampler", WrongShape)
    assert pipeline.health()["sampler"]["implementation"] == "per_request"

    class FailsAfterItsTrial(Sampler):
        def __init__(self, seed: int | None = None) -> None:
            super().__init__(seed)
            self.calls = 0

        def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("sampler fell over")
            return get_sampler("default").sample(logits, states)

    pipeline.clear_trace()
    pipeline.swap("sampler", FailsAfterItsTrial)
    assert run_all(pipeline) == expected, "each step it failed in was sampled by the one before it"
    health = pipeline.health()
    assert health["sampler"]["implementation"] == "per_request" and "fell over" in health["sampler"]["last_swap_error"]
    assert health["worker-0"]["sampler"] == health["worker-1"]["sampler"] == "per_request"
    swaps = pipeline.trace().swaps
    assert list(swaps.implementation)[-1] == "per_request" and "fell over" in swaps.error.iloc[-1]
    pipeline.swap("sampler", "default")


@pytest.mark.slow
def test_the_attention_backend_swaps_on_every_worker_and_must_agree(pipeline: Pipeline, expected: list[str]) -> None:
    pipeline.clear_trace()
    assert run_all(pipeline, during=lambda: pipeline.swap("attention", "torch_ref")) == expected
    health = pipeline.health()
    assert health["worker-0"]["attention_backend"] == health["worker-1"]["attention_backend"] == "torch_ref"
    swaps = pipeline.trace().swaps
    assert sorted(swaps.component) == ["worker-0.attention", "worker-1.attention"]

    class Sloppy(TorchReferenceAttention):  # the right shape, the wrong numbers: refused by the probe
        def forward(self, query, key, value, kv_cache, metadata, scale):  # type: ignore[no-untyped-def]
            return super().forward(query, key, value, kv_cache, metadata, scale * 1.1)

    with pytest.raises(RemoteError, match="differs from the backend in charge"):
        pipeline.swap("attention", Sloppy)

    class FailsAfterItsTrial(TorchReferenceAttention):
        calls = 0

        def forward(self, query, key, value, kv_cache, metadata, scale):  # type: ignore[no-untyped-def]
            type(self).calls += 1
            if type(self).calls > 1:
                raise RuntimeError("attention fell over")
            return super().forward(query, key, value, kv_cache, metadata, scale)

    pipeline.swap("attention", FailsAfterItsTrial)
    assert run_all(pipeline) == expected
    health = pipeline.health()
    for worker in ("worker-0", "worker-1"):  # each worker that stepped put its previous backend back
        assert health[worker]["attention_backend"] == "torch_ref"
        assert "attention fell over" in health[worker]["last_swap_error"]
    pipeline.swap("attention", "torch_batched")
