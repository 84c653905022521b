"""The KV cache manager: which blocks each request holds, and prefix-cache lookups.

The scheduler asks it two questions each step, in vLLM V1's terms:

- ``get_computed_blocks(request)``: for a request about to be admitted, the longest run of
  its leading full blocks already in the cache (a prefix hit), so those tokens are skipped;
- ``allocate_slots(request, num_new_tokens, ...)``: make room for ``num_new_tokens`` more
  tokens; ``None`` when there are not enough free blocks (the scheduler then preempts or
  waits; nothing is half-allocated).

and tells it two things: ``cache_blocks(request, n)`` once a forward has computed the
request's first ``n`` tokens (their full blocks become findable by hash), and
``free(request)`` when a request finishes or is preempted.
The block ids it hands out are exactly the block tables the worker runs the model on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from modkit.kvcache.block_pool import NULL_BLOCK_ID, BlockPool, KVCacheBlock
from modkit.kvcache.events import BlockActivitySink, KVEventSink
from modkit.kvcache.eviction import EvictionPolicy
from modkit.kvcache.hashing import hash_request_blocks

if TYPE_CHECKING:
    from modkit.kvcache.interface import BlockHandles, KVRequest


@dataclass(frozen=True, slots=True)
class KVCacheStats:
    num_blocks_total: int  # allocatable blocks (the reserved null block not counted)
    num_blocks_free: int  # free now, cached or not
    num_blocks_cached: int  # blocks findable by hash (held or free)
    usage: float  # fraction of blocks held by requests (vllm:kv_cache_usage_perc)
    prefix_cache_queries: int  # tokens looked up (vllm:prefix_cache_queries)
    prefix_cache_hits: int  # of those, tokens found cached (vllm:prefix_cache_hits)
    num_evictions: int  # cached blocks whose content was dropped to reuse the block


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        event_sink: KVEventSink | None = None,
        activity_sink: BlockActivitySink | None = None,
        eviction_policy: str | type[EvictionPolicy] = "lru",
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching, event_sink, eviction_policy)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # per request: leading blocks already hashed
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.activity_sink = activity_sink  # told who did what to which block (live views)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def get_computed_blocks(self, request: KVRequest) -> tuple[list[KVCacheBlock], int]:
        """Leading blocks of ``request`` found in the prefix cache, and how many tokens they hold.

        At most ``num_tokens - 1`` tokens count as a hit: the last token must be computed
        anyway, since its logits are what the next token is sampled from.
        """
        if not self.enable_prefix_caching:
            return [], 0
        self._update_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self,
        request: KVRequest,
        num_new_tokens: int,
        new_computed_blocks: BlockHandles = (),
        num_new_computed_tokens: int = 0,
    ) -> int | None:
        """Blocks for ``num_new_tokens`` more tokens, after taking ``new_computed_blocks`` (a prefix hit).

        ::

            | computed | prefix hit (new_computed) | new tokens (num_new_tokens) |
            |<-- request's blocks -->|<-- blocks to allocate now -------------->|

        Returns how many blocks were newly allocated (0 when the held ones have room), or
        ``None``, changing nothing, when the free blocks do not suffice.
        """
        held = self.req_to_blocks.get(request.req_id)
        first_allocation = held is None
        num_held = 0 if held is None else len(held)
        total = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        num_needed = -(-total // self.block_size) - num_held - len(new_computed_blocks)
        if num_needed <= 0 and not new_computed_blocks and not first_allocation:
            return 0  # room in the blocks it holds (most decode steps): nothing changes
        hits = cast("Sequence[KVCacheBlock]", new_computed_blocks)  # what get_computed_blocks gave
        # Hit blocks that nobody holds sit in the free queue; taking them uses up free blocks too.
        num_free_hits = sum(1 for b in hits if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_free_hits:
            return None

        blocks = self.req_to_blocks.setdefault(request.req_id, [])
        self.pool.touch(hits)
        blocks.extend(hits)
        evicted: list[int] = []
        new_blocks = self.pool.get_new_blocks(max(num_needed, 0), evicted)
        blocks.extend(new_blocks)
        if self.activity_sink is not None:
            self._tell("hit", request.req_id, [b.block_id for b in hits])
            self._tell("evicted", request.req_id, evicted)
            self._tell("allocated", request.req_id, [b.block_id for b in new_blocks])
        if first_allocation and self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_new_computed_tokens
        return len(new_blocks)

    def cache_blocks(self, request: KVRequest, num_computed_tokens: int) -> None:
        """Make the request's full, computed blocks findable by hash (and publish BlockStored).

        Called after the forward that computed them, never at allocation: a request may be
        preempted after its blocks were allocated in a step and before that step ran, and
        a block indexed then would hand uncomputed keys and values to the next prefix hit.
        """
        blocks = self.req_to_blocks.get(request.req_id)
        if not self.enable_prefix_caching or not blocks:
            return
        num_full = min(num_computed_tokens, request.num_tokens) // self.block_size
        num_cached = self.num_cached_blocks.get(request.req_id, 0)
        if num_full <= num_cached:
            return  # no block filled up this step (most decode steps); hashes catch up when one does
        self._update_hashes(request)
        # Only a view needs to know which blocks this call hashed: look only when one listens (a hot path).
        watched = self.activity_sink is not None
        unhashed = [b for b in blocks[num_cached:num_full] if b.block_hash is None] if watched else []
        self.pool.cache_full_blocks(blocks, request.block_hashes, request.all_token_ids, num_cached, num_full)
        self.num_cached_blocks[request.req_id] = max(num_cached, num_full)
        if watched:
            self._tell("cached", request.req_id, [b.block_id for b in unhashed if b.block_hash is not None])

    def free(self, request: KVRequest) -> None:
        """Release the request's blocks, last block first, so its tail is evicted before its prefix."""
        blocks = self.req_to_blocks.pop(request.req_id, [])
        self.num_cached_blocks.pop(request.req_id, None)
        self.pool.free_blocks(reversed(blocks))
        if self.activity_sink is not None:
            self._tell("freed", request.req_id, [b.block_id for b in reversed(blocks)])

    def block(self, block_id: int) -> KVCacheBlock:
        """The handle of block ``block_id`` (what ``get_computed_blocks`` returns, by id)."""
        return self.pool.blocks[block_id]

    def get_block_ids(self, req_id: str, start: int = 0) -> list[int]:
        """The request's block table from its ``start``-th block (the scheduler asks only for new ones)."""
        blocks = self.req_to_blocks.get(req_id, [])
        if start >= len(blocks):
            return []  # nothing new: most decode steps, for every running request
        return [b.block_id for b in blocks[start:]]

    def held_req_ids(self) -> set[str]:
        """Requests that hold blocks now."""
        return set(self.req_to_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (vllm:kv_cache_usage_perc)."""
        return self.pool.usage

    def prepare_admissions(self, requests: Sequence[KVRequest], token_budget: int) -> None:
        """Nothing to prepare in-process: each lookup and allocation is a call (see ``KVCacheManagerInterface``)."""

    def flush(self) -> None:
        """Nothing to do in-process: every call already took effect (see ``KVCacheManagerInterface``)."""

    def reset_prefix_cache(self) -> bool:
        reset = self.pool.reset_prefix_cache()
        if reset and self.activity_sink is not None:
            self.activity_sink("cleared", None, [])
        return reset

    def _tell(self, kind: str, req_id: str, block_ids: list[int]) -> None:
        if block_ids and self.activity_sink is not None:
            self.activity_sink(kind, req_id, block_ids)

    def stats(self) -> KVCacheStats:
        return KVCacheStats(
            num_blocks_total=self.pool.num_blocks - 1,
            num_blocks_free=self.pool.num_free_blocks,
            num_blocks_cached=len(self.pool.cached),
            usage=self.pool.usage,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            num_evictions=self.pool.num_evictions,
        )

    def _update_hashes(self, request: KVRequest) -> None:
        hash_request_blocks(request.all_token_ids, self.block_size, request.block_hashes)

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent. Cheap enough for every test step."""
        pool = self.pool
        holders = [0] * pool.num_blocks
        for req_id, blocks in self.req_to_blocks.items():
            assert len({b.block_id for b in blocks}) == len(blocks), f"{req_id} holds a block twice"
            for block in blocks:
                holders[block.block_id] += 1
        free_ids = [b.block_id for b in pool.eviction]
        assert len(set(free_ids)) == len(free_ids), "a block is in the eviction policy twice"
        assert len(free_ids) == pool.num_free_blocks, "the eviction policy's free blocks are not the pool's count"
        free_set = set(free_ids)
        assert NULL_BLOCK_ID not in free_set and holders[NULL_BLOCK_ID] == 0, "null block handed out"
        for block in pool.blocks[1:]:
            assert block.ref_cnt == holders[block.block_id], f"{block}: {holders[block.block_id]} holders"
            assert (block.block_id in free_set) == (block.ref_cnt == 0), f"{block} free-queue membership"
            if block.block_hash is not None:
                assert pool.cached.get(block.block_hash) is block, f"{block} hash not indexed"
        for block_hash, block in pool.cached.items():
            assert block.block_hash == block_hash, f"index entry of {block} has a stale hash"
        used = sum(1 for b in pool.blocks[1:] if b.ref_cnt > 0)
        assert used + pool.num_free_blocks == pool.num_blocks - 1, "free + used != total"
