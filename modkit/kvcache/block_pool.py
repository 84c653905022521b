"""The block pool: every KV block, its reference count, the free queue, and the hash index.

Life of a block::

    free (ref 0, no hash) --allocate--> in use (ref >= 1) --block fills--> in use + cached (hash set)
           ^                                                                     | request frees it
           |                                                                     v
           +---- evicted (hash dropped) <--allocate takes it from the head--- free + cached (ref 0)

A freed block keeps its hash and stays findable until an allocation needs it: that is what
lets a later request with the same prefix skip recomputing it (a prefix-cache hit). The free
queue orders reuse: allocations take from the head, frees append to the tail, so the least
recently used cached block is evicted first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from modkit.kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventSink
from modkit.kvcache.hashing import BlockHash

NULL_BLOCK_ID = 0  # reserved, as in vLLM: never allocated, so 0 can pad block tables


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None  # set once the block is full and cached
    # Links of the free queue; None when the block is not in it.
    prev_free: KVCacheBlock | None = None
    next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        cached = "cached" if self.block_hash is not None else "-"
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, {cached})"


class FreeBlockQueue:
    """Doubly linked list of free blocks, least recently freed at the head.

    A list would do for append and pop, but a prefix-cache hit must pull a block out of the
    *middle* (it is free, cached, and now wanted again): linked, that is O(1).
    """

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)  # sentinels: no None checks at the ends
        self._tail = KVCacheBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        if block is None or block is self._tail:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        assert block.prev_free is not None and block.next_free is not None, f"{block} is not free"
        block.prev_free.next_free, block.next_free.prev_free = block.next_free, block.prev_free
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self.num_free_blocks += 1

    def __iter__(self) -> Iterator[KVCacheBlock]:
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free


class BlockPool:
    """Owns all ``num_blocks`` blocks. Knows nothing of requests: the manager tracks ownership."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        event_sink: KVEventSink | None = None,
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
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self.cached: dict[BlockHash, KVCacheBlock] = {}  # hash -> the block holding that content
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: free ones, cached or not."""
        return self.free_queue.num_free_blocks

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
            block = self.free_queue.popleft()
            if evicted is not None and block.block_hash is not None:
                evicted.append(block.block_id)
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """A request starts using cached blocks: count it, and take free ones out of the queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each; blocks no one holds go to the tail of the free queue,
        in the order given (the first given is evicted first)."""
        for block in ordered_blocks:
            assert block.ref_cnt > 0 and block is not self.null_block, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

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
        self.num_evictions += 1

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Only when no request holds a block; returns whether it did."""
        if self.num_free_blocks != self.num_blocks - 1:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        if self.event_sink is not None:
            self.event_sink(AllBlocksCleared())
        return True
