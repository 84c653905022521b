"""The KV cache manager: block accounting, prefix caching, LRU eviction, KV events."""

from __future__ import annotations

import subprocess
import sys

import pytest

from modkit.kvcache import (
    NONE_HASH,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventLog,
    KVCacheBlock,
    KVCacheManager,
    LRUEviction,
    hash_block_tokens,
)
from modkit.request import Request
from modkit.sampling_params import SamplingParams


def make_request(req_id: str, tokens: list[int]) -> Request:
    return Request(req_id, tokens, SamplingParams(max_tokens=8))


def compute(manager: KVCacheManager, request: Request) -> list[int]:
    """Admit a request the way the scheduler does: prefix lookup, then allocate the rest."""
    hits, num_hit = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - num_hit, hits, num_hit) is not None
    request.num_computed_tokens = request.num_tokens
    manager.cache_blocks(request, request.num_computed_tokens)  # after "the forward"
    manager.check_invariants()
    return manager.get_block_ids(request.req_id)


def test_lru_list_removes_from_the_middle_and_keeps_order() -> None:
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = LRUEviction()
    queue.extend(blocks)
    queue.remove(blocks[2])
    assert [b.block_id for b in queue] == [0, 1, 3, 4]
    queue.add(blocks[2])
    assert queue.pop() is blocks[0]
    assert [b.block_id for b in queue] == [1, 3, 4, 2]


def test_block_hashes_chain_and_agree_across_processes() -> None:
    first = hash_block_tokens(NONE_HASH, [1, 2, 3, 4])
    # The same tokens after a different prefix are different content.
    assert hash_block_tokens(first, [5, 6, 7, 8]) != hash_block_tokens(NONE_HASH, [5, 6, 7, 8])
    assert hash_block_tokens(NONE_HASH, [1, 2, 3, 4], ("lora-a",)) != first
    code = (
        "from modkit.kvcache import NONE_HASH, hash_block_tokens; print(hash_block_tokens(NONE_HASH, [1,2,3,4]).hex())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == first.hex()


def test_allocation_fails_cleanly_when_blocks_run_out() -> None:
    manager = KVCacheManager(num_blocks=5, block_size=4)  # 4 usable: block 0 is reserved
    a = make_request("a", list(range(12)))  # 3 blocks
    compute(manager, a)
    b = make_request("b", list(range(100, 108)))  # needs 2, 1 free
    assert manager.allocate_slots(b, 8) is None
    assert manager.get_block_ids("b") == [] and manager.num_free_blocks == 1
    manager.check_invariants()
    assert 0 not in manager.get_block_ids("a")
    manager.free(a)
    manager.check_invariants()
    assert manager.num_free_blocks == 4


def test_prefix_hit_skips_full_blocks_and_shares_them() -> None:
    log = EventLog()
    manager = KVCacheManager(num_blocks=20, block_size=4, event_sink=log)
    system = list(range(10))  # 2 full blocks + 2 tokens
    a = make_request("a", [*system, 50, 51, 52])
    a_blocks = compute(manager, a)
    b = make_request("b", [*system, 60, 61])
    hits, num_hit = manager.get_computed_blocks(b)
    assert num_hit == 8 and [h.block_id for h in hits] == a_blocks[:2]
    compute(manager, b)
    assert manager.get_block_ids("b")[:2] == a_blocks[:2]
    assert [manager.pool.blocks[i].ref_cnt for i in a_blocks[:2]] == [2, 2]
    stats = manager.stats()
    assert stats.prefix_cache_queries == 13 + 12 and stats.prefix_cache_hits == 8
    stored = [e for e in log.events if isinstance(e, BlockStored)]
    assert stored[0].parent_block_hash is None and stored[0].token_ids == a.all_token_ids[:12]
    assert stored[0].block_hashes == a.block_hashes[:3]
    # b's only new full block (tokens 8..11) chains to a's second block.
    assert stored[1].parent_block_hash == a.block_hashes[1] and stored[1].token_ids == [8, 9, 60, 61]


def test_the_last_token_is_never_a_hit() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=4)
    compute(manager, make_request("a", list(range(8))))
    _, num_hit = manager.get_computed_blocks(make_request("b", list(range(8))))
    assert num_hit == 4  # 8 tokens cached, but the 8th must be recomputed for its logits


def test_freed_blocks_stay_cached_until_evicted_least_recently_used_first() -> None:
    log = EventLog()
    manager = KVCacheManager(num_blocks=7, block_size=2, event_sink=log)  # 6 usable
    a = make_request("a", [1, 2, 3, 4, 5, 6])  # 3 blocks
    b = make_request("b", [7, 8, 9, 10, 11, 12])  # 3 blocks
    a_blocks, b_blocks = compute(manager, a), compute(manager, b)
    manager.free(a)
    manager.free(b)
    assert manager.stats().num_blocks_cached == 6 and manager.num_free_blocks == 6
    # Freed tail-first: a's last block is the first to go, then the middle one.
    c = make_request("c", [20, 21, 22, 23])
    c_blocks = compute(manager, c)
    assert c_blocks == [a_blocks[2], a_blocks[1]]
    removed = [e for e in log.events if isinstance(e, BlockRemoved)]
    assert [r.block_hashes[0] for r in removed] == [a.block_hashes[2], a.block_hashes[1]]
    assert manager.stats().num_evictions == 2
    # a's first block and all of b's are still findable.
    _, hit = manager.get_computed_blocks(make_request("a2", [1, 2, 3, 4, 5, 6]))
    assert hit == 2
    _, hit = manager.get_computed_blocks(make_request("b2", [7, 8, 9, 10, 11, 12, 13]))
    assert hit == 6
    assert b_blocks  # held the content found above


def test_prefix_caching_off_finds_nothing_and_emits_nothing() -> None:
    log = EventLog()
    manager = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False, event_sink=log)
    compute(manager, make_request("a", list(range(9))))
    assert manager.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    assert log.events == [] and manager.stats().num_blocks_cached == 0


def test_reset_prefix_cache_only_when_idle() -> None:
    log = EventLog()
    manager = KVCacheManager(num_blocks=10, block_size=4, event_sink=log)
    a = make_request("a", list(range(9)))
    compute(manager, a)
    assert not manager.reset_prefix_cache()
    manager.free(a)
    assert manager.reset_prefix_cache()
    assert isinstance(log.events[-1], AllBlocksCleared) and manager.stats().num_blocks_cached == 0
    manager.check_invariants()


def test_invariant_check_catches_a_leak() -> None:
    manager = KVCacheManager(num_blocks=6, block_size=4)
    compute(manager, make_request("a", list(range(5))))
    manager.pool.blocks[manager.get_block_ids("a")[0]].ref_cnt += 1  # a reference nobody holds
    with pytest.raises(AssertionError, match="holders"):
        manager.check_invariants()
