"""The router's policies, and KV-aware routing fed by real engines' KV events."""

from __future__ import annotations

import pytest

from modkit import LLM, SamplingParams
from modkit.kvcache import AllBlocksCleared, BlockRemoved, BlockStored, EventLog, hash_request_blocks
from modkit.model import encode_chat, load_tokenizer
from modkit.router import NoWorkerError, Router


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
