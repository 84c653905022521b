"""Eviction policies: which free block an allocation takes next.

A free block may still hold cached content (a prefix another request could hit). When an
allocation needs a block, the pool asks its eviction policy which free block to take; if
that block is cached, its content is dropped (evicted). So the policy decides which
prefixes survive a full cache::

    free blocks, in the policy's order:   [ next to go ... last to go ]
    allocate  -> pop():     takes the first           (its cached content, if any, is evicted)
    free      -> add(b):    a block nobody holds now  (the manager frees a request's tail first)
    prefix hit -> remove(b): a free cached block is wanted again

The pool keeps the ground truth (reference counts, hashes, the count of free blocks);
a policy only keeps an order, so one can replace another at any moment: the new policy
is handed the free blocks in the old one's order (``BlockPool.set_eviction_policy``).
A policy swapped in live runs inside a ``GuardedEviction`` (``modkit.guard``): the pool's
own methods call whatever policy is in charge and never check.

Two built-ins, to contrast:

- ``lru`` (vLLM's): the least recently freed block goes first. A system prompt shared by
  every request survives only as long as requests keep coming back to it faster than
  other prompts push it out.
- ``lfu``: blocks that were never cached go first, then cached blocks with the fewest
  prefix hits, least recently freed first among equals. A much-shared prefix survives a
  burst of one-off prompts that would flush it under LRU; a prefix that was popular once
  can outstay its welcome.

Register others with ``register_eviction_policy``.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, ClassVar

from modkit.guard import Guarded
from modkit.registry import Registry, implementation_name

if TYPE_CHECKING:
    from modkit.kvcache.block_pool import KVCacheBlock


class EvictionPolicy(ABC):
    """An order over the free blocks. Every method is called with the pool's ground truth
    already updated: ``add`` with ``block.ref_cnt == 0``, ``remove`` with ``ref_cnt == 1``."""

    name: ClassVar[str]

    @abstractmethod
    def add(self, block: KVCacheBlock) -> None:
        """``block`` became free (nobody holds it); its hash, if any, is still findable."""

    @abstractmethod
    def remove(self, block: KVCacheBlock) -> None:
        """A free block was taken back by a prefix hit: it is no longer a candidate."""

    @abstractmethod
    def pop(self) -> KVCacheBlock:
        """The free block to hand out next, removed from the candidates."""

    @abstractmethod
    def __iter__(self) -> Iterator[KVCacheBlock]:
        """The free blocks, next to go first (for views, checks and handing over)."""

    def extend(self, blocks: Iterable[KVCacheBlock]) -> None:
        for block in blocks:
            self.add(block)


EVICTION_POLICIES: Registry[EvictionPolicy] = Registry("eviction policy")
register_eviction_policy = EVICTION_POLICIES.register


def eviction_policies() -> list[str]:
    return EVICTION_POLICIES.names()


def policy_name(policy: object) -> str:
    """A policy's registry name, or its class's name for one that is not registered."""
    return implementation_name(policy)


@register_eviction_policy("lru")
class LRUEviction(EvictionPolicy):
    """Least recently freed first: a doubly linked list through the blocks themselves.

    A list would do for append and pop, but a prefix-cache hit must pull a block out of the
    *middle* (it is free, cached, and now wanted again): linked, that is O(1).
    """

    def __init__(self) -> None:
        from modkit.kvcache.block_pool import KVCacheBlock

        self._head = KVCacheBlock(-1)  # sentinels: no None checks at the ends
        self._tail = KVCacheBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head

    def pop(self) -> KVCacheBlock:
        block = self._head.next_free
        if block is None or block is self._tail:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        assert block.prev_free is not None and block.next_free is not None, f"{block} is not in the LRU list"
        block.prev_free.next_free, block.next_free.prev_free = block.next_free, block.prev_free
        block.prev_free = block.next_free = None

    def add(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block

    def __iter__(self) -> Iterator[KVCacheBlock]:
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free


@register_eviction_policy("lfu")
class LFUEviction(EvictionPolicy):
    """Uncached blocks first, then the fewest prefix hits, then least recently freed.

    A heap keyed by ``(cached, num_hits, last_freed)``. A block's key cannot change while it
    is free (hits happen only to blocks being taken, hashes are set only on held blocks), so
    ``remove`` just forgets the block and ``pop`` skips heap entries of forgotten blocks.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int, int]] = []
        self._members: dict[int, KVCacheBlock] = {}  # block id -> block, for blocks in the candidates

    @staticmethod
    def _key(block: KVCacheBlock) -> tuple[int, int, int, int]:
        return (block.block_hash is not None, block.num_hits, block.last_freed, block.block_id)

    def add(self, block: KVCacheBlock) -> None:
        self._members[block.block_id] = block
        heapq.heappush(self._heap, self._key(block))

    def remove(self, block: KVCacheBlock) -> None:
        del self._members[block.block_id]
        if len(self._heap) > 2 * len(self._members) + 64:  # mostly entries of blocks taken by hits
            self._heap = [self._key(b) for b in self._members.values()]
            heapq.heapify(self._heap)

    def pop(self) -> KVCacheBlock:
        while self._heap:
            key = heapq.heappop(self._heap)
            block = self._members.get(key[-1])
            if block is not None and self._key(block) == key:
                del self._members[key[-1]]
                return block
        raise IndexError("no free blocks")

    def __iter__(self) -> Iterator[KVCacheBlock]:
        return iter(sorted(self._members.values(), key=self._key))


class GuardedEviction(Guarded[EvictionPolicy], EvictionPolicy):
    """A policy swapped in live, with the one it replaced as its fallback.

    The fallback stands by empty: two policies cannot both hold the free blocks (LRU links
    them through the blocks themselves). When the candidate fails, the pool's ``on_failure``
    fills the fallback from its ground truth (the free blocks, least recently freed first)
    and puts it in charge; so that ``pop`` gets its block from the fallback, while ``add``
    and ``remove``, already counted in the ground truth, leave the fallback nothing to do.
    A ``pop`` that hands out a block someone holds counts as a failure.
    """

    def __init__(
        self,
        candidate: EvictionPolicy,
        fallback: EvictionPolicy,
        on_failure: Callable[[Guarded[EvictionPolicy]], None],
    ) -> None:
        # on_failure is required here: without it, the empty fallback would answer.
        super().__init__(candidate, fallback, on_failure)

    def add(self, block: KVCacheBlock) -> None:
        self.guarded("add", lambda p: p.add(block), _nothing_left)

    def remove(self, block: KVCacheBlock) -> None:
        self.guarded("remove", lambda p: p.remove(block), _nothing_left)

    def pop(self) -> KVCacheBlock:
        return self.guarded("pop", _pop_free)

    def __iter__(self) -> Iterator[KVCacheBlock]:
        return iter(self.guarded("__iter__", lambda p: list(p)))


def _nothing_left(policy: EvictionPolicy) -> None:
    return None


def _pop_free(policy: EvictionPolicy) -> KVCacheBlock:
    block = policy.pop()
    if block.ref_cnt != 0:  # the null block too: it is held for good
        raise ValueError(f"returned {block}, which is not free")
    return block


def try_policy(cls: type[EvictionPolicy], blocks: Iterable[KVCacheBlock]) -> None:
    """Try a fresh ``cls`` on stand-ins of ``blocks``, all free: raises if it misbehaves.

    What a swap runs before it hands a live pool to the policy: add every block, list them,
    take one back as a prefix hit would, then pop every other one; each must be a free block,
    given exactly once. The real blocks are never touched.
    """
    from modkit.kvcache.block_pool import KVCacheBlock

    stand_ins = [KVCacheBlock(b.block_id, 0, b.block_hash, b.num_hits, b.last_freed) for b in blocks]
    policy = cls()
    policy.extend(stand_ins)
    listed = sorted(b.block_id for b in policy)
    if listed != sorted(b.block_id for b in stand_ins):
        raise ValueError(f"{policy_name(policy)} lists {len(listed)} free blocks after {len(stand_ins)} were added")
    if stand_ins:
        hit = stand_ins[len(stand_ins) // 2]
        hit.ref_cnt = 1
        policy.remove(hit)
    for _ in range(max(len(stand_ins) - 1, 0)):
        block = policy.pop()
        if block.ref_cnt != 0 or all(block is not b for b in stand_ins):
            raise ValueError(f"{policy_name(policy)}.pop() returned {block}, which is not a free block")
        block.ref_cnt = 1
