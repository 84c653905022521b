"""The router's policies, and KV-aware routing fed by real engines' KV events."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from waiting import wait_until

from modkit import LLM, SamplingParams
from modkit.config import PipelineConfig
from modkit.kvcache import AllBlocksCleared, BlockRemoved, BlockStored, EventLog, hash_request_blocks
from modkit.kvcache.service import KVCacheService
from modkit.model import encode_chat, load_tokenizer
from modkit.pipeline.addresses import PipelineAddresses
from modkit.protocol import AddRequest, KVAdmit, KVCacheComputed, KVFree, RequestsFinished
from modkit.router import NoWorkerError, Router
from modkit.router.service import RouterService
from modkit.transport import Outbox, RpcServer


def test_round_robin_cycles_and_skips_dead_workers() -> None:
    router = Router(3, block_size=4, policy="round_robin")
    assert [router.route(f"r{i}", [1, 2, 3]) for i in range(4)] == [0, 1, 2, 0]
    router.mark_dead(1)
    assert {router.route(f"s{i}", [1, 2, 3]) for i in range(4)} == {0, 2}
    router.mark_dead(0)
    router.mark_dead(2)
    with pytest.raises(NoWorkerError):
        router.route("t", [1])


def test_least_loaded_counts_requests_until_they_finish() -> None:
    router = Router(2, block_size=4, policy="least_loaded")
    assert router.route("a", [1]) == 0
    assert router.route("b", [1]) == 1
    assert router.route("c", [1]) == 0
    router.finish("b")
    router.finish("c")
    assert router.route("d", [1]) == 1  # worker 0 still has "a"
    assert router.workers[0].num_active_requests == 1 and router.workers[0].active_blocks == 1


def test_kv_aware_weighs_cached_prefix_against_load() -> None:
    router = Router(2, block_size=4, policy="kv_aware")
    prompt = list(range(100, 132))  # 8 blocks
    hashes = hash_request_blocks(prompt, 4, [])
    router.on_kv_event(1, BlockStored(hashes[:6], None, prompt[:24], 4))
    assert router.route("a", prompt) == 1  # costs: worker 0 = 8, worker 1 = 2
    assert router.policy.last_costs == {0: 8, 1: 2}  # type: ignore[attr-defined]
    # Worker 1 now carries a's 8 blocks: 2 + 8 = 10 > 8, so the same prompt goes to worker 0.
    assert router.route("b", prompt) == 0
    router.finish("a")
    router.on_kv_event(1, BlockRemoved(hashes[2:6]))  # evicted: only 2 leading blocks remain
    assert router.workers[1].prefix_hit_blocks(hashes) == 2
    router.on_kv_event(1, AllBlocksCleared())
    assert router.workers[1].cached == set()


def test_kv_aware_keeps_each_system_prompt_on_one_engine(tiny_model_dir) -> None:
    """Two real engines publish their KV events to the router; requests sharing a system
    prompt end up where that prompt is cached, so the prefix hit rate beats round robin."""
    tokenizer = load_tokenizer(tiny_model_dir)
    systems = [
        "You are a helpful assistant who loves animals and answers in short sentences.",
        "You are the modkit demo assistant. Many users share this system prompt, so it is cached.",
    ]
    questions = [
        "Hello!",
        "What does a cow say?",
        "Who are you?",
        "What color is the sky?",
        "Thank you!",
        "What is 2 plus 3?",
    ]
    # Systems in the order A A B B A A B B ...: round robin spreads each over both engines.
    system_of = [(i // 2) % 2 for i in range(12)]
    prompts = [
        encode_chat(
            tokenizer,
            [{"role": "system", "content": systems[system_of[i]]}, {"role": "user", "content": questions[i % 6]}],
        )
        for i in range(12)
    ]

    def hit_rate(policy: str) -> tuple[float, list[int]]:
        logs = [EventLog(), EventLog()]
        engines = [LLM(num_kv_blocks=256, block_size=4, kv_event_sink=log) for log in logs]
        router = Router(2, block_size=4, policy=policy)
        chosen = []
        for i, prompt in enumerate(prompts):  # one at a time, so each sees the events of the last
            worker = router.route(str(i), prompt)
            chosen.append(worker)
            engines[worker].generate(
                {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False
            )
            router.finish(str(i))
            for w, log in enumerate(logs):
                for event in log.take():
                    router.on_kv_event(w, event)
        hits = sum(e.stats()["prefix_cache_hits"] for e in engines)
        return hits / sum(len(p) for p in prompts), chosen

    kv_rate, kv_choice = hit_rate("kv_aware")
    rr_rate, rr_choice = hit_rate("round_robin")
    assert set(rr_choice) == {0, 1}
    # Each system prompt stays on the engine that first computed it ...
    for system in (0, 1):
        assert len({kv_choice[i] for i in range(12) if system_of[i] == system}) == 1
    # ... so less of the prompts is recomputed than when round robin spreads them.
    assert kv_rate > rr_rate + 0.05, (kv_rate, rr_rate)


# -- the router process's view of each cache, when KV events are lost ---------------------------

BLOCK = 16


@contextmanager
def kv_cache_manager(addresses: PipelineAddresses, num_blocks: list[int]) -> Iterator[KVCacheService]:
    """The KV cache manager of a pipeline, served as its process serves it (RPC and KV events), in a thread."""
    service = KVCacheService(num_blocks, BLOCK, events_address=addresses.kv_events)
    server = RpcServer(service, addresses.rpc("kv_cache_manager"))
    stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(stop, 0.01), daemon=True)
    thread.start()
    try:
        yield service
    finally:
        stop.set()
        thread.join(5)
        server.close()
        service.close()


def ran(service: KVCacheService, pool: int, req_id: str, tokens: list[int]) -> None:
    """What a scheduler has the KV cache manager do for a request that ran and finished: admit it,
    cache its full blocks after the forward, free them (they stay findable in the prefix cache)."""
    ops = [KVAdmit(req_id, tokens, 0, len(tokens)), KVCacheComputed(req_id, [], len(tokens)), KVFree(req_id)]
    service.apply(pool, ops)  # type: ignore[arg-type]


def route(router: RouterService, to_router: Outbox, req_id: str, tokens: list[int]) -> int:
    """Send the router a request and turn its loop until it has routed it, then until it has heard
    that it finished (it no longer loads its worker); the worker it chose."""
    before = Counter(router.router.decisions)
    to_router.send(AddRequest(req_id, tokens, SamplingParams(max_tokens=1), (), time.time()))
    assert wait_until(lambda: router.run_once() or router.router.decisions != before, 5, 0.001), "never routed"
    ((worker_id, _),) = (router.router.decisions - before).items()
    to_router.send(RequestsFinished([req_id]))
    idle = router.router.workers[worker_id]
    assert wait_until(lambda: router.run_once() or idle.num_active_requests == 0, 5, 0.001), "never finished"
    return worker_id


def test_the_router_takes_a_snapshot_of_a_cache_whose_kv_events_it_lost(tmp_path: Path) -> None:
    """A router started after the KV cache manager (a restarted one) missed every event; one
    subscribed when a KV cache manager started again missed its first ones. Before routing, it
    takes a snapshot of each pool, so KV-aware routing sends a cached prefix where it is cached."""
    addresses = PipelineAddresses.at(str(tmp_path / "ipc"))
    config = PipelineConfig(num_workers=2, block_size=BLOCK, router_policy="kv_aware").to_dict()
    system = list(range(1000, 1064))  # four blocks
    router: RouterService | None = None
    to_router = Outbox(addresses.inbox("router"))

    def router_hears(pool: int, service: KVCacheService) -> bool:
        assert router is not None
        router.run_once()
        return router.router.workers[pool].cached == set(service.pools[pool].pool.cached)

    try:
        with kv_cache_manager(addresses, [32, 32]) as service:
            ran(service, 0, "a", list(range(2000, 2064)))
            ran(service, 1, "b", [*system, 7, 8])  # nobody subscribes: its events are lost
            router = RouterService(config, addresses.ipc_dir, worker_timeout_s=600)
            assert wait_until(service.kv_events_subscribed, 5), "the router's subscription never arrived"
            # Both views start empty, so the costs would tie and worker 0 win: worker 1 only from a snapshot.
            assert route(router, to_router, "c", [*system, 9]) == 1
            stats = router.stats()
            for i in (0, 1):
                assert router.router.workers[i].cached == set(service.pools[i].pool.cached) != set()
                assert stats["workers"][i]["kv_view_complete"] and stats["workers"][i]["kv_snapshots"] == 1
                # Neither pool's events came (both before the subscription), yet each view holds them all.
                assert stats["workers"][i]["kv_view_events"] == service.pool_kv_events[i] > 0
            # Subscribed now: what a pool caches next comes as events, in order, and no snapshot is taken.
            ran(service, 0, "d", list(range(3000, 3048)))
            assert wait_until(lambda: router_hears(0, service), 5, 0.001), "the event never reached the router"
            assert route(router, to_router, "e", [*system, 10]) == 1
            assert router.stats()["kv_snapshots"] == 2
        with kv_cache_manager(addresses, [32, 32]) as restarted:
            ran(restarted, 1, "f", list(range(4000, 4064)))  # before the router's subscription is back: lost
            # (ZeroMQ subscribes again as the router's loop turns.)
            resubscribed = lambda: router.run_once() or restarted.kv_events_subscribed()  # noqa: E731
            assert wait_until(resubscribed, 5, 0.001), "the router never subscribed again"
            ran(restarted, 0, "g", [*system, 11])
            # Its numbers went back: the router forgot what the old pools cached. Pool 1's first events
            # never came, so routing takes a snapshot of it; the prefix is cached on worker 0 now.
            assert wait_until(lambda: router_hears(0, restarted), 5, 0.001), "the new pool's events never came"
            assert not router.stats()["workers"][1]["kv_view_complete"]
            assert route(router, to_router, "h", [*system, 12]) == 0
            for i in (0, 1):
                assert router.router.workers[i].cached == set(restarted.pools[i].pool.cached) != set()
            assert router.stats()["kv_snapshots"] == 3
    finally:
        to_router.close()
        if router is not None:
            router.close()


def test_a_kv_snapshot_is_what_the_pool_caches_through_evictions_and_a_reset(tmp_path: Path) -> None:
    """The KV cache manager's snapshot is built from its own events, as a router's view is: it must
    equal the pool's prefix cache after blocks were evicted (``BlockRemoved``) and the cache reset."""
    addresses = PipelineAddresses.at(str(tmp_path / "ipc"))
    service = KVCacheService([8], BLOCK, events_address=addresses.kv_events)  # 7 blocks: every prompt evicts
    try:
        for i in range(6):
            ran(service, 0, f"r{i}", list(range(100 * i, 100 * i + 3 * BLOCK)))
            snapshot = service.kv_snapshot(0)
            assert set(snapshot.block_hashes) == set(service.pools[0].pool.cached)
            assert snapshot.seq == service.stats()["pools"][0]["num_kv_events"]
        assert service.pools[0].pool.num_evictions > 0 and len(service.pools[0].pool.cached) > 0
        assert service.reset_prefix_cache(0)
        assert service.kv_snapshot(0).block_hashes == [] and service.pools[0].pool.cached == {}
    finally:
        service.close()
