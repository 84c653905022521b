"""Eviction policies: which cached prefix survives a full cache, handing a live pool from one
policy to another, and a swapped-in policy that misbehaves being put aside."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from modkit.kvcache import KVCacheBlock, KVCacheManager, LFUEviction, LRUEviction, eviction_policies
from modkit.kvcache.eviction import EvictionPolicy, try_policy
from modkit.request import Request
from modkit.sampling_params import SamplingParams

BLOCK = 4
SYSTEM = list(range(100, 108))  # two full blocks, shared by the "chat" requests


def run(manager: KVCacheManager, req_id: str, tokens: list[int]) -> int:
    """Admit, compute and finish one request; returns its prefix-hit tokens."""
    request = Request(req_id, tokens, SamplingParams(max_tokens=1))
    hits, num_hit = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - num_hit, hits, num_hit) is not None
    request.num_computed_tokens = request.num_tokens
    manager.cache_blocks(request, request.num_computed_tokens)
    manager.check_invariants()
    manager.free(request)
    manager.check_invariants()
    return num_hit


def shared_prompt_then_a_burst(policy: str) -> int:
    """Three requests share a system prompt, then 4 one-off prompts fill the cache; how much of
    the system prompt does the next request still find?"""
    manager = KVCacheManager(1 + 8, BLOCK, eviction_policy=policy)
    for i in range(3):
        run(manager, f"chat-{i}", [*SYSTEM, 200 + i, 201 + i, 202 + i, 203 + i, 1])
    for i in range(4):
        run(manager, f"one-off-{i}", list(range(1000 * (i + 1), 1000 * (i + 1) + 4 * BLOCK + 1)))
    return run(manager, "chat-again", [*SYSTEM, 7, 7, 7, 7, 1])


def test_lfu_keeps_a_much_hit_prefix_that_lru_lets_a_burst_flush() -> None:
    assert eviction_policies() == ["lfu", "lru"]
    assert shared_prompt_then_a_burst("lru") == 0, "LRU: the system prompt was freed longest ago, so it went first"
    assert shared_prompt_then_a_burst("lfu") == len(SYSTEM), "LFU: its 2 hits outrank the one-offs' 0"


def test_lfu_order_uncached_then_fewest_hits_then_least_recently_freed() -> None:
    blocks = [KVCacheBlock(i) for i in range(1, 6)]
    for block, cached, hits, freed in zip(blocks, [1, 0, 1, 1, 0], [3, 0, 0, 0, 0], [1, 5, 2, 3, 4], strict=True):
        block.block_hash = b"h%d" % block.block_id if cached else None
        block.num_hits, block.last_freed = hits, freed
    policy = LFUEviction()
    policy.extend(blocks)
    assert [b.block_id for b in policy] == [5, 2, 3, 4, 1]
    policy.remove(blocks[2])  # block 3: a prefix hit takes it back
    assert [policy.pop().block_id for _ in range(4)] == [5, 2, 4, 1]
    with pytest.raises(IndexError):
        policy.pop()


def test_a_live_pool_is_handed_over_in_order_and_both_policies_serve_it() -> None:
    manager = KVCacheManager(1 + 8, BLOCK)
    run(manager, "a", [*SYSTEM, 1, 2, 3, 4, 5])
    order = [b.block_id for b in manager.pool.eviction]
    manager.pool.set_eviction_policy(LFUEviction, keep_fallback=True)
    assert sorted(b.block_id for b in manager.pool.eviction) == sorted(order)
    manager.check_invariants()
    assert run(manager, "b", [*SYSTEM, 9, 9]) == len(SYSTEM)
    manager.pool.set_eviction_policy(LRUEviction)
    assert run(manager, "c", [*SYSTEM, 8, 8]) == len(SYSTEM)
    assert manager.pool.eviction_error is None


class PopsTwice(EvictionPolicy):
    """Hands out the same block again: the pool must notice, not give one block to two requests."""

    def __init__(self) -> None:
        self.blocks: list[KVCacheBlock] = []

    def add(self, block: KVCacheBlock) -> None:
        self.blocks.append(block)

    def remove(self, block: KVCacheBlock) -> None:
        self.blocks.remove(block)

    def pop(self) -> KVCacheBlock:
        return self.blocks[0]

    def __iter__(self) -> Iterator[KVCacheBlock]:
        return iter(list(self.blocks))


class Raises(LRUEviction):
    def pop(self) -> KVCacheBlock:
        raise RuntimeError("out of ideas")


@pytest.mark.parametrize("broken", [PopsTwice, Raises])
def test_a_misbehaving_policy_is_caught_by_the_trial_or_put_aside(broken: type[EvictionPolicy]) -> None:
    manager = KVCacheManager(1 + 8, BLOCK)
    with pytest.raises((ValueError, RuntimeError)):
        try_policy(broken, manager.pool.blocks[1:])
    run(manager, "a", [*SYSTEM, 1])
    # Swapped in without the trial, it fails on the first allocation: the pool puts LRU back
    # and answers that allocation with it.
    manager.pool.set_eviction_policy(broken, keep_fallback=True)
    assert run(manager, "b", [*SYSTEM, 2, 2, 2, 2, 2]) == len(SYSTEM)
    assert isinstance(manager.pool.eviction, LRUEviction)
    assert manager.pool.eviction_error is not None and manager.pool.fallback_policy is None
    assert run(manager, "c", list(range(50, 50 + 8 * BLOCK - 1))) == 0  # the whole pool, with no block twice
