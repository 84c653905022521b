"""``VLLMKVCacheManager``: modkit's KV cache manager contract, backed by vLLM's ``KVCacheManager``.

modkit's scheduler (or the KV service) calls it exactly as it calls modkit's own manager;
underneath, every decision (which blocks, which prefix hits, what to evict) is vLLM's::

    modkit Request --mirror--> vllm.v1.request.Request (same req_id; tokens and
        |                      num_computed_tokens synced on every call; vLLM hashes them)
        v
    get_computed_blocks / allocate_slots / cache_blocks / free  -->  vllm KVCacheManager
                                                                      (block pool, LRU, hashes)
    block handles are vLLM's ``KVCacheBlock``s; ``block(block_id)`` maps an id back

Real differences from modkit's ``KVCacheManager``, kept rather than hidden:

- **When blocks become findable.** vLLM caches every full block *at allocation*, before
  the forward that computes it, so a request admitted later in the same step already hits
  it (``cache_at_allocation=True``, vLLM's behaviour). modkit caches only after the forward
  (``cache_blocks``). ``cache_at_allocation=False`` passes vLLM's own
  ``delay_cache_blocks`` switch and caches in ``cache_blocks`` instead, as modkit does.
  NOTE: modkit's scheduler can take back, in the same step, blocks it allocated to a
  running request that it then preempts; cached at allocation, such a block stays
  findable with keys and values that were never computed.
- **Which free block is reused.** vLLM puts a freed block that holds no hash at the
  *head* of the free queue (reused first, "LIFO for locality") and only cached ones at
  the tail; modkit appends every freed block to the tail. Same counts, other block ids.
- **Hashes.** vLLM hashes blocks with its own SHA-256 encoding and root, so the hashes
  in the translated ``BlockStored`` / ``BlockRemoved`` events (the low 64 bits, as vLLM
  publishes them) never match modkit's ``hash_request_blocks``: a router that hashes
  prompts with modkit's function will not find these blocks.
- Block ids are valid in both: 1 .. num_blocks - 1, block 0 being the null block.

``event_sink`` receives vLLM's KV events translated to modkit's dataclasses;
``activity_sink`` receives the same block activity modkit's manager reports, worked out
from vLLM's state after each call (only computed when a sink listens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from modkit.kvcache.events import AllBlocksCleared, BlockActivitySink, BlockRemoved, BlockStored, KVEvent, KVEventSink
from modkit.kvcache.hashing import BlockHash
from modkit.kvcache.interface import BlockHandles, KVRequest
from modkit.kvcache.manager import KVCacheStats
from modkit.vllm_v1.bridge import (
    KVCacheBlocks,
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmKVCacheBlock,
    VllmKVCacheManager,
    VllmRequest,
    VllmSamplingParams,
    block_hasher,
    kv_cache_config,
)


class VLLMKVCacheManager:
    """modkit's ``KVCacheManagerInterface`` (plus the KV service's extras) over vLLM's manager."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        event_sink: KVEventSink | None = None,
        activity_sink: BlockActivitySink | None = None,
        *,
        cache_at_allocation: bool = True,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        manager = VllmKVCacheManager(
            kv_cache_config(num_blocks, block_size),
            # No request outgrows the pool, so the pool's token capacity is a safe length cap.
            max_model_len=num_blocks * block_size,
            scheduler_block_size=block_size,
            hash_block_size=block_size,
            enable_caching=enable_prefix_caching,
            enable_kv_cache_events=True,  # translated for event_sink; they also count evictions
        )
        self._attach(manager, block_size, event_sink, activity_sink, cache_at_allocation)
        self.owns_requests = True

    @classmethod
    def viewing(cls, manager: Any, block_size: int, event_sink: KVEventSink | None = None) -> VLLMKVCacheManager:
        """A read-only view (usage, stats, block tables, invariants) of a manager a vLLM scheduler owns.

        Its owner hands it the manager's KV events through ``publish``.
        """
        view = cls.__new__(cls)
        view._attach(manager, block_size, event_sink, None, True)
        view.owns_requests = False  # the scheduler keeps the requests; this view keeps no mirrors
        return view

    def _attach(
        self,
        manager: Any,
        block_size: int,
        event_sink: KVEventSink | None,
        activity_sink: BlockActivitySink | None,
        cache_at_allocation: bool,
    ) -> None:
        self.manager = manager
        self.pool = manager.block_pool
        self.block_size = block_size
        self.enable_prefix_caching = bool(manager.enable_caching)
        self.cache_at_allocation = cache_at_allocation
        self.event_sink = event_sink
        self.activity_sink = activity_sink
        # req_id -> its blocks: the one per-request table of the single full-attention group.
        self._tables: dict[str, list[Any]] = manager.coordinator.single_type_managers[0].req_to_blocks
        self.mirrors: dict[str, Any] = {}  # req_id -> the vLLM Request mirroring it
        self._hasher = block_hasher(block_size)
        self._params = VllmSamplingParams(max_tokens=1)  # a vLLM Request needs some
        self._cached_ids: set[int] = set()  # blocks known to hold a hash (kept only for activity_sink)
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_evictions = 0

    # -- the interface ---------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return int(self.pool.get_num_free_blocks())

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (vllm:kv_cache_usage_perc)."""
        return float(self.manager.usage)

    def get_computed_blocks(self, request: KVRequest) -> tuple[list[Any], int]:
        """vLLM's longest prefix hit for ``request`` (at most ``num_tokens - 1`` tokens)."""
        hits, num_hit, _ = self.manager.get_computed_blocks(self._mirror(request))
        return list(hits.blocks[0]), int(num_hit)

    def allocate_slots(
        self,
        request: KVRequest,
        num_new_tokens: int,
        new_computed_blocks: BlockHandles = (),
        num_new_computed_tokens: int = 0,
    ) -> int | None:
        """vLLM's ``allocate_slots``: how many new blocks, or None (nothing changed) when too few are free."""
        first_allocation = not self._tables.get(request.req_id)
        mirror = self._mirror(request)
        hit_blocks = cast("list[VllmKVCacheBlock]", list(new_computed_blocks))  # what get_computed_blocks gave
        hits = KVCacheBlocks((hit_blocks,)) if hit_blocks else None
        new = self.manager.allocate_slots(
            mirror,
            num_new_tokens,
            num_new_computed_tokens=num_new_computed_tokens,
            new_computed_blocks=hits,
            delay_cache_blocks=not self.cache_at_allocation,
        )
        if new is None:
            return None
        new_blocks = list(new.blocks[0])
        if first_allocation and self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_new_computed_tokens
        if self.activity_sink is not None:
            evicted = [b.block_id for b in new_blocks if b.block_id in self._cached_ids]
            self._cached_ids.difference_update(evicted)
            self._tell("hit", request.req_id, [b.block_id for b in hit_blocks])
            self._tell("evicted", request.req_id, evicted)
            self._tell("allocated", request.req_id, [b.block_id for b in new_blocks])
            self._tell_cached(request.req_id)
        self._drain_events()
        return len(new_blocks)

    def cache_blocks(self, request: KVRequest, num_computed_tokens: int) -> None:
        """Cache the request's computed full blocks; with ``cache_at_allocation`` vLLM already did."""
        if not self.enable_prefix_caching or not self._tables.get(request.req_id):
            return
        mirror = self._mirror(request)
        self.manager.cache_blocks(mirror, min(num_computed_tokens, mirror.num_tokens))
        if self.activity_sink is not None:
            self._tell_cached(request.req_id)
        self._drain_events()

    def free(self, request: KVRequest) -> None:
        """Release the request's blocks (vLLM frees the tail first) and forget its mirror."""
        mirror = self.mirrors.pop(request.req_id, None)
        if mirror is None:
            return
        freed = [b.block_id for b in reversed(self._tables.get(request.req_id, []))]
        self.manager.free(mirror)
        self._tell("freed", request.req_id, freed)
        self._drain_events()

    def get_block_ids(self, req_id: str, start: int = 0) -> list[int]:
        return [b.block_id for b in self._tables.get(req_id, [])[start:]]

    def held_req_ids(self) -> set[str]:
        """Requests that hold blocks now."""
        return {req_id for req_id, blocks in self._tables.items() if blocks}

    def block(self, block_id: int) -> VllmKVCacheBlock:
        """The handle of block ``block_id``, as ``get_computed_blocks`` returns it."""
        return self.pool.blocks[block_id]

    def prepare_admissions(self, requests: Sequence[KVRequest], token_budget: int) -> None:
        """Nothing to prepare in-process (see ``KVCacheManagerInterface``)."""

    def flush(self) -> None:
        """Nothing to do in-process: every call already took effect."""

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only when no request holds a block (vLLM's rule too)."""
        reset = bool(self.manager.reset_prefix_cache())
        if reset:
            self._cached_ids.clear()
            if self.activity_sink is not None:
                self.activity_sink("cleared", None, [])
        self._drain_events()
        return reset

    def stats(self) -> KVCacheStats:
        return KVCacheStats(
            num_blocks_total=self.pool.num_gpu_blocks - 1,
            num_blocks_free=self.num_free_blocks,
            num_blocks_cached=len(self.pool.cached_block_hash_to_block),
            usage=self.usage,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            num_evictions=self.num_evictions,
        )

    def check_invariants(self) -> None:
        """Raise AssertionError if vLLM's pool and the block tables disagree (modkit's invariants)."""
        pool = self.pool
        holders = [0] * pool.num_gpu_blocks
        for req_id, blocks in self._tables.items():
            assert len({b.block_id for b in blocks}) == len(blocks), f"{req_id} holds a block twice"
            for block in blocks:
                holders[block.block_id] += 1
        free_ids = {b.block_id for b in pool.free_block_queue.get_all_free_blocks()}
        assert len(free_ids) == pool.get_num_free_blocks(), "free queue count is off"
        assert 0 not in free_ids and holders[0] == 0, "null block handed out"
        for block in pool.blocks[1:]:
            assert block.ref_cnt == holders[block.block_id], f"{block.block_id}: {holders[block.block_id]} holders"
            assert (block.block_id in free_ids) == (block.ref_cnt == 0), f"{block.block_id} free-queue membership"
        used = sum(1 for b in pool.blocks[1:] if b.ref_cnt > 0)
        assert used + len(free_ids) == pool.num_gpu_blocks - 1, "free + used != total"
        if self.owns_requests:
            assert self.held_req_ids() <= set(self.mirrors), "blocks held by a forgotten request"

    # -- internals ---------------------------------------------------------------------

    def _mirror(self, request: KVRequest) -> Any:
        """The vLLM request for ``request``, with its tokens and ``num_computed_tokens`` brought up to date."""
        mirror = self.mirrors.get(request.req_id)
        if mirror is None:
            mirror = VllmRequest(
                request.req_id, list(request.all_token_ids), self._params, None, block_hasher=self._hasher
            )
            self.mirrors[request.req_id] = mirror
        elif request.num_tokens > mirror.num_tokens:
            mirror.append_output_token_ids(list(request.all_token_ids[mirror.num_tokens :]))  # hashes new full blocks
        mirror.num_computed_tokens = request.num_computed_tokens
        return mirror

    def publish(self, events: Sequence[Any]) -> None:
        """Translate vLLM KV events for ``event_sink``; BlockRemoved ones count as evictions."""
        for event in events:
            translated = _translate(event)
            if isinstance(translated, BlockRemoved):
                self.num_evictions += len(translated.block_hashes)
            if translated is not None and self.event_sink is not None:
                self.event_sink(translated)

    def _drain_events(self) -> None:
        self.publish(self.manager.take_events())

    def _tell(self, kind: str, req_id: str, block_ids: list[int]) -> None:
        if block_ids and self.activity_sink is not None:
            self.activity_sink(kind, req_id, block_ids)

    def _tell_cached(self, req_id: str) -> None:
        hashed = [b.block_id for b in self._tables.get(req_id, []) if b.block_hash is not None]
        new = [b for b in hashed if b not in self._cached_ids]
        self._cached_ids.update(new)
        self._tell("cached", req_id, new)


def _block_hash(value: int | bytes) -> BlockHash:
    """vLLM publishes the low 64 bits of a block hash as an int; modkit's events carry bytes."""
    return BlockHash(value.to_bytes(8, "big") if isinstance(value, int) else bytes(value))


def _translate(event: Any) -> KVEvent | None:
    """modkit's event for one of vLLM's (None for kinds modkit has no name for)."""
    if isinstance(event, VllmBlockStored):
        return BlockStored(
            block_hashes=[_block_hash(h) for h in event.block_hashes],
            parent_block_hash=None if event.parent_block_hash is None else _block_hash(event.parent_block_hash),
            token_ids=list(event.token_ids),
            block_size=event.block_size,
            lora_id=event.lora_id,
            medium=event.medium,
        )
    if isinstance(event, VllmBlockRemoved):
        return BlockRemoved(block_hashes=[_block_hash(h) for h in event.block_hashes], medium=event.medium)
    if isinstance(event, VllmAllBlocksCleared):
        return AllBlocksCleared()
    return None
