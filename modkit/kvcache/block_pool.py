"""The block pool: every KV block, its reference count, the free queue, and the hash index.

Life of a block::

    free (ref 0, no hash) --allocate--> in use (ref >= 1) --block fills--> in use + cached (hash set)
           ^                                                                     | request frees it
           |                                                                     v
           +---- evicted (hash dropped) <--allocate takes it from the head--- free + cached (ref 0)

A freed block keeps its hash and stays findable until an allocation needs it: that is what
lets a later request with the same prefix skip recomputing it (a prefix-cache hit). Which
free block an allocation takes, and so which cached content is evicted, is the eviction
policy's choice (``modkit.kvcache.eviction``: ``lru`` by default, as in vLLM).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from modkit.guard import Guarded, in_charge
from modkit.kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventSink
from modkit.kvcache.eviction import EVICTION_POLICIES, EvictionPolicy, GuardedEviction, policy_name
from modkit.kvcache.hashing import BlockHash

NULL_BLOCK_ID = 0  # reserved, as in vLLM: never allocated, so 0 can pad block tables


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None  # set once the block is full and cached
    num_hits: int = 0  # prefix hits on its cached content (0 again once evicted)
    last_freed: int = 0  # the pool's tick when it last became free: the order of frees
    # Links of the LRU eviction policy's list; None when the block is not in it.
    prev_free: KVCacheBlock | None = None
    next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        cached = "cached" if self.block_hash is not None else "-"
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, {cached})"


class BlockPool:
    """Owns all ``num_blocks`` blocks. Knows nothing of requests: the manager tracks ownership."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        event_sink: KVEventSink | None = None,
        eviction_policy: str | type[EvictionPolicy] = "lru",
    ) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.event_sink = event_sink
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        self.null_block.ref_cnt = 1  # permanently held, never freed
        self.cached: dict[BlockHash, KVCacheBlock] = {}  # hash -> the block holding that content
        self.num_evictions = 0
        self.num_free_blocks = num_blocks - 1  # blocks an allocation can take now: free ones, cached or not
        self._tick = 0  # counts frees, for ``last_freed``
        for block in self.blocks[1:]:
            block.last_freed = self._next_tick()
        cls = EVICTION_POLICIES.get(eviction_policy) if isinstance(eviction_policy, str) else eviction_policy
        # The policy in charge; a GuardedEviction while one swapped in live is on trial.
        self.eviction: EvictionPolicy = cls()
        self.eviction.extend(self.blocks[1:])
        self.eviction_error: str | None = None  # why the last swapped-in policy was put aside

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    @property
    def usage(self) -> float:
        """Fraction of allocatable blocks held by requests (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.num_free_blocks / (self.num_blocks - 1)

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached.get(block_hash)

    def get_new_blocks(self, n: int, evicted: list[int] | None = None) -> list[KVCacheBlock]:
        """Take ``n`` blocks from the head of the free queue, evicting their cached content
        (the ids of blocks that lost a hash are appended to ``evicted``, if given)."""
        if n > self.num_free_blocks:
            raise ValueError(f"asked for {n} blocks, {self.num_free_blocks} are free")
        blocks = []
        for _ in range(n):
            block = self.eviction.pop()
            assert block.ref_cnt == 0, f"the eviction policy handed out {block}, which is not free"
            self.num_free_blocks -= 1
            if evicted is not None and block.block_hash is not None:
                evicted.append(block.block_id)
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """A prefix hit: count it on each block, and take the free ones back from the eviction policy."""
        for block in blocks:
            block.ref_cnt += 1
            block.num_hits += 1
            if block.ref_cnt == 1:
                self.num_free_blocks -= 1
                self.eviction.remove(block)

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each; blocks no one holds go to the eviction policy, in the
        order given (under LRU, the first given is evicted first)."""
        for block in ordered_blocks:
            assert block.ref_cnt > 0 and block is not self.null_block, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                block.last_freed = self._next_tick()
                self.num_free_blocks += 1
                self.eviction.add(block)

    def cache_full_blocks(
        self,
        blocks: list[KVCacheBlock],
        block_hashes: list[BlockHash],
        token_ids: list[int],
        num_cached: int,
        num_full: int,
    ) -> None:
        """Give blocks ``num_cached .. num_full-1`` of a request their hashes and index them."""
        if not self.enable_caching or num_full <= num_cached:
            return
        stored = []
        for i in range(num_cached, num_full):
            block, block_hash = blocks[i], block_hashes[i]
            if block.block_hash is not None:  # already cached: a prefix hit reused it
                continue
            if block_hash in self.cached:
                # Two requests computed the same block at once; the first copy stays indexed.
                continue
            block.block_hash = block_hash
            self.cached[block_hash] = block
            stored.append(i)
        if self.event_sink is None:
            return
        # One event per run of consecutive blocks, so each run's parent hash is right.
        runs: list[list[int]] = []
        for i in stored:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        size = self.block_size
        for run in runs:
            self.event_sink(
                BlockStored(
                    block_hashes=[block_hashes[i] for i in run],
                    parent_block_hash=block_hashes[run[0] - 1] if run[0] > 0 else None,
                    token_ids=list(token_ids[run[0] * size : (run[-1] + 1) * size]),
                    block_size=size,
                )
            )

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        if self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
        if self.event_sink is not None:
            self.event_sink(BlockRemoved(block_hashes=[block.block_hash]))
        block.block_hash = None
        block.num_hits = 0
        self.num_evictions += 1

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Only when no request holds a block; returns whether it did."""
        if self.num_free_blocks != self.num_blocks - 1:
            return False
        for block in self.blocks:
            block.block_hash, block.num_hits = None, 0
        self.cached.clear()
        # The free blocks' keys changed: rebuild the order, with the same policy (and fallback).
        policy = self.eviction
        if isinstance(policy, GuardedEviction):
            self._put_in_charge(type(policy.candidate), type(policy.fallback))
        else:
            self._put_in_charge(type(policy), None)
        if self.event_sink is not None:
            self.event_sink(AllBlocksCleared())
        return True

    # -- the eviction policy ---------------------------------------------------------------

    def free_block_list(self) -> list[KVCacheBlock]:
        """The free blocks, by the pool's own account, least recently freed first."""
        return sorted((b for b in self.blocks[1:] if b.ref_cnt == 0), key=lambda b: b.last_freed)

    @property
    def fallback_policy(self) -> type[EvictionPolicy] | None:
        """The class put back if the policy in charge fails: set only while a swapped-in one is on trial."""
        return type(self.eviction.fallback) if isinstance(self.eviction, GuardedEviction) else None

    def set_eviction_policy(self, cls: type[EvictionPolicy], keep_fallback: bool = False) -> None:
        """Put ``cls`` in charge, handing it the free blocks in the current policy's order.

        With ``keep_fallback``, it runs inside a ``GuardedEviction`` that keeps the current
        policy's class as the one to put back if the new one raises (or hands out a block that
        is not free).
        """
        self._put_in_charge(cls, type(in_charge(self.eviction)) if keep_fallback else None)

    def put_back_fallback(self) -> None:
        """A swapped-in policy is rolled back without having failed here (it failed in another
        pool): its fallback takes over, handed the free blocks in its order."""
        if isinstance(self.eviction, GuardedEviction):
            self._put_in_charge(type(self.eviction.fallback), None)

    def _put_in_charge(self, cls: type[EvictionPolicy], fallback: type[EvictionPolicy] | None) -> None:
        try:
            order = list(self.eviction)
        except Exception:  # the policy in charge is broken: fall back to the order of frees
            order = self.free_block_list()
        policy = cls()
        policy.extend(order)
        self.eviction = policy if fallback is None else GuardedEviction(policy, fallback(), self._fallback_takes_over)

    def _fallback_takes_over(self, guard: Guarded[EvictionPolicy]) -> None:
        """The swapped-in policy failed (``on_failure`` of its guard): fill the fallback from the
        pool's ground truth and put it in charge, before it answers the call that failed."""
        self.eviction_error = f"{policy_name(guard.candidate)}: {guard.error}"
        guard.fallback.extend(self.free_block_list())
        self.eviction = guard.fallback
