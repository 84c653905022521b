"""The KV cache manager as its own process: ``KVCacheService``.

::

    scheduler process                                    KV cache manager process
    Scheduler -> KVCacheManagerClient(pool=i)  --apply(i, [ops])-->  KVCacheService
                 (kvcache/client.py)           <--KVApplyReply----     pools[i]: KVCacheManager
                                                                       events --PUB "worker.<i>"--> router

The service holds one ``KVCacheManager`` (its own block pool and prefix cache) per
worker, because each worker has its own KV cache tensors. Every block id a worker
computes into was handed out here. ``apply`` runs a batch of operations in order and
answers them in one reply (``KVApplyReply``): the client decides what travels together.

Restarts on either side: a scheduler's client opens each pool with ``reset(pool, generation)``
(every block freed, the prefix cache forgotten), and names that generation in every ``apply``.
An ``apply`` of any other generation is refused before anything is applied
(``UnknownGeneration``): a restarted KV cache manager knows none, so the scheduler learns
that its blocks are gone and rebuilds; a restarted scheduler resets the pools it opens, so
the blocks of the one before are freed. Each ``apply`` also carries a sequence number: the
same number again (a retry after a lost reply) gets the remembered reply, applied once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from modkit.guard import SwapOwner, trial
from modkit.kvcache.events import KVEvent, apply_kv_event, event_to_wire
from modkit.kvcache.eviction import EVICTION_POLICIES, try_policy
from modkit.kvcache.hashing import BlockHash
from modkit.kvcache.manager import KVCacheManager
from modkit.protocol import KVAdmit, KVAllocate, KVApplyReply, KVFree, KVGetComputed, KVOp, KVSnapshot
from modkit.swap import ImplSpec, resolve
from modkit.trace.events import BlockActivity, BlockEvents, EventPublisher, Swapped

MANAGERS = ("modkit", "vllm")  # whole managers, swapped only when no block is held (see _swap_manager)


@dataclass(slots=True)
class _RemoteRequest:
    """What the service knows of a request: its tokens so far, for block hashes (a ``KVRequest``)."""

    req_id: str
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_hashes: list[BlockHash] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


class UnknownGeneration(RuntimeError):
    """``apply`` named a generation this pool was not reset for: the caller's blocks are not here."""


class KVCacheService(SwapOwner):
    """One ``KVCacheManager`` per worker pool.

    Publishes vLLM's KV events on topic ``worker.<pool>`` (what the router learns the
    cache from) and, for views and traces, each call's block activity as one
    ``BlockEvents`` on ``blocks.<pool>``.
    """

    implementation = "modkit"  # whose KV cache manager: "modkit", or "vllm" (modkit.vllm_v1)

    def __init__(
        self,
        num_blocks: list[int],
        block_size: int,
        enable_prefix_caching: bool = True,
        events_address: str | None = None,
        allow_remote: bool = False,
        eviction_policy: str = "lru",
        swap_key: str | None = None,
    ) -> None:
        self.started = time.time()
        self.swap_key = swap_key  # verifies classes sent by value (modkit.swap); None: none accepted
        self.last_swap_error: str | None = None
        self.publisher = (
            EventPublisher("kv_cache_manager", events_address, allow_remote) if events_address is not None else None
        )
        self.activity: list[BlockActivity] = []  # of the call being served; published when it ends
        self.watched = False  # whether anyone subscribes to the block activity of the call being served
        self.num_blocks, self.block_size, self.enable_prefix_caching = num_blocks, block_size, enable_prefix_caching
        self.pools: list[Any] = [
            KVCacheManager(n, block_size, enable_prefix_caching, self._sink(i), self._note, eviction_policy)
            for i, n in enumerate(num_blocks)
        ]
        self.eviction_policy = eviction_policy
        self.previous_policy = eviction_policy  # the name to show again if a swapped-in policy is put aside
        self.requests: list[dict[str, _RemoteRequest]] = [{} for _ in num_blocks]
        self.generations: list[str | None] = [None] * len(num_blocks)  # set by reset(): whose blocks each pool holds
        self.last_replies: list[tuple[int, KVApplyReply] | None] = [None] * len(num_blocks)  # (seq, reply), for retries
        self.num_calls = 0
        self.num_ops = 0
        self.num_kv_events = 0  # published for the router; its /stats counts those it received
        self.pool_kv_events = [0] * len(num_blocks)  # of them, on each pool's topic (worker.<pool>): its next seq
        # Per pool, what a router that received every one of its KV events would know it caches (kv_snapshot).
        self.cached_hashes: list[set[BlockHash]] = [set() for _ in num_blocks]

    def _sink(self, pool: int) -> Any:
        def publish(event: KVEvent) -> None:
            apply_kv_event(self.cached_hashes[pool], event)
            if self.publisher is not None:
                self.publisher.publish(f"worker.{pool}", event_to_wire(event))
                self.num_kv_events += 1
                self.pool_kv_events[pool] += 1

        return publish

    def _note(self, kind: str, req_id: str | None, block_ids: list[int]) -> None:
        if self.watched:
            self.activity.append(BlockActivity(kind, req_id, block_ids))

    def _watch(self, pool: int) -> None:
        """Note the block activity of the call about to run only if someone subscribes to it."""
        self.watched = self.publisher is not None and self.publisher.wants(f"blocks.{pool}")

    def _publish_activity(self, pool: int) -> None:
        if self.publisher is not None and self.activity:
            manager = self.pools[pool]
            event = BlockEvents(pool, time.time(), self.activity, manager.num_free_blocks, manager.usage)
            self.publisher.publish(f"blocks.{pool}", event)
        self.activity = []

    def announce_events(self, token: str) -> None:
        """Publish ``Hello(token)``: tells a new subscriber that its subscription arrived."""
        if self.publisher is not None:
            self.publisher.announce(token)

    def apply(self, pool: int, ops: list[KVOp], generation: str | None = None, seq: int | None = None) -> KVApplyReply:
        """Run ``ops`` on pool ``pool`` in order; one result per op.

        With a ``generation`` (what the scheduler's client sends), the pool must have been
        ``reset`` for it, else ``UnknownGeneration`` and nothing is applied; a ``seq`` equal to
        the last one's answers the remembered reply (the caller retries after a lost reply).
        """
        if generation is not None and generation != self.generations[pool]:
            raise UnknownGeneration(f"pool {pool} holds generation {self.generations[pool]}, not {generation}")
        last = self.last_replies[pool]
        if seq is not None and last is not None and last[0] == seq:
            return last[1]
        reply = self._apply(pool, ops)
        if seq is not None:
            self.last_replies[pool] = (seq, reply)
        return reply

    def reset(self, pool: int, generation: str) -> KVApplyReply:
        """Free every block of pool ``pool`` and forget its prefix cache: it belongs to ``generation`` now."""
        manager = self.pools[pool]
        self._watch(pool)
        for request in self.requests[pool].values():
            manager.free(request)
        self.requests[pool] = {}
        manager.reset_prefix_cache()  # tells the router (AllBlocksCleared) that the pool forgot everything
        self._publish_activity(pool)
        self.generations[pool], self.last_replies[pool] = generation, None
        return KVApplyReply([], manager.num_free_blocks, manager.usage)

    def _apply(self, pool: int, ops: list[KVOp]) -> KVApplyReply:
        started = time.perf_counter()
        manager, requests = self.pools[pool], self.requests[pool]
        self._watch(pool)
        results: list[Any] = []
        left = 0  # of the token budget, after the last KVAdmit (0: not admitted, or used up)
        for op in ops:
            if isinstance(op, KVFree):
                gone = requests.pop(op.req_id, None)
                if gone is not None:
                    manager.free(gone)
                results.append(None)
                continue
            request = requests.get(op.req_id)
            if request is None:
                request = requests[op.req_id] = _RemoteRequest(op.req_id)
            request.all_token_ids.extend(op.new_token_ids)
            request.num_computed_tokens = op.num_computed_tokens
            if isinstance(op, KVGetComputed):
                hits, num_hit = manager.get_computed_blocks(request)
                results.append([[b.block_id for b in hits], num_hit])
            elif isinstance(op, KVAdmit):
                budget = left if op.follows else op.token_budget
                admitted = self._admit(manager, request, budget) if budget > 0 else None
                left = 0 if admitted is None else budget - admitted[2]
                results.append(admitted)
            elif isinstance(op, KVAllocate):
                held = len(manager.get_block_ids(op.req_id)) + len(op.hit_block_ids)
                hit_blocks = [manager.block(i) for i in op.hit_block_ids]
                new = manager.allocate_slots(request, op.num_new_tokens, hit_blocks, op.num_hit_tokens)
                results.append(None if new is None else manager.get_block_ids(op.req_id, held))
            else:
                manager.cache_blocks(request, op.num_computed_tokens)
                results.append(None)
        self.num_calls += 1
        self.num_ops += len(ops)
        self._publish_activity(pool)
        if self.implementation == "modkit" and manager.pool.eviction_error is not None:
            self._roll_back(manager.pool.eviction_error)
        return KVApplyReply(results, manager.num_free_blocks, manager.usage, time.perf_counter() - started)

    @staticmethod
    def _admit(manager: Any, request: _RemoteRequest, token_budget: int) -> list[Any] | None:
        """The scheduler's admission of a waiting request, on the pool: its prefix-cache hit, then
        blocks for what the budget allows. [the blocks it gained (hits, then new ones), tokens hit,
        tokens to compute], or None, changing nothing, when the free blocks do not suffice."""
        held = len(manager.get_block_ids(request.req_id))
        hit_blocks, num_hit = manager.get_computed_blocks(request)
        num_new = min(request.num_tokens - num_hit, token_budget)
        if manager.allocate_slots(request, num_new, hit_blocks, num_hit) is None:
            return None
        return [manager.get_block_ids(request.req_id, held), num_hit, num_new]

    def kv_snapshot(self, pool: int) -> KVSnapshot:
        """The hashes pool ``pool``'s KV events so far leave cached, and the seq of its next event:
        a router that lost some of them replaces its view of the pool with this (``modkit.router.service``)."""
        return KVSnapshot(pool, self.pool_kv_events[pool], list(self.cached_hashes[pool]))

    def block_tables(self, pool: int) -> dict[str, list[int]]:
        manager = self.pools[pool]
        return {r: manager.get_block_ids(r) for r in manager.held_req_ids()}

    def check_invariants(self, pool: int) -> None:
        self.pools[pool].check_invariants()
        assert self.pools[pool].held_req_ids() <= set(self.requests[pool]), "blocks held by a forgotten request"

    def reset_prefix_cache(self, pool: int) -> bool:
        """Forget the pool's cached blocks (its worker restarted with an empty cache); False if any is held."""
        self.requests[pool] = {r: q for r, q in self.requests[pool].items() if r in self.pools[pool].held_req_ids()}
        self._watch(pool)
        reset = self.pools[pool].reset_prefix_cache()
        self._publish_activity(pool)
        return reset

    # -- swapping the eviction policy -----------------------------------------------------

    def swap(self, spec: ImplSpec) -> dict[str, Any]:
        """Put another eviction policy in charge of every pool, between two calls.

        It is first tried on stand-ins of a pool's blocks (``try_policy``): if it fails, the
        error goes back to the caller and nothing changes. Each pool then hands the new
        policy its free blocks in the old policy's order. If the new policy raises later,
        that pool's allocation is answered by the old one, which comes back in every pool.
        """
        if spec.name in MANAGERS:
            return self._swap_manager(spec.name)
        if self.implementation != "modkit":
            raise RuntimeError("eviction policies are modkit's: swap the manager back to 'modkit' first")
        cls = resolve(spec, EVICTION_POLICIES.get, self.swap_key)
        trial(cls, lambda c: try_policy(c, self.pools[0].pool.blocks[1:]))  # a class: each pool gets its own
        previous, self.eviction_policy = self.eviction_policy, spec.label(cls)
        self.previous_policy = previous
        for manager in self.pools:
            manager.pool.set_eviction_policy(cls, keep_fallback=True)
        self._swapped_in("kv_cache_manager", self.eviction_policy, previous)
        return {"implementation": self.eviction_policy, "previous": previous}

    def _swap_manager(self, name: str) -> dict[str, Any]:
        """Replace every pool's manager: modkit's, or vLLM's own KVCacheManager (``modkit.vllm_v1``).

        Block tables cannot be handed from one manager to the other, so this needs every pool
        idle (``Pipeline.swap`` drains the scheduler first). The new managers start with an
        empty prefix cache.
        """
        held = {i: len(m.held_req_ids()) for i, m in enumerate(self.pools) if m.held_req_ids()}
        if held:
            raise RuntimeError(f"requests hold blocks in pools {held}: drain before swapping the KV cache manager")
        pools: list[Any] = []
        for i, n in enumerate(self.num_blocks):
            if name == "vllm":
                from modkit.vllm_v1.kv_cache_manager import VLLMKVCacheManager

                # Blocks become findable after the forward, as modkit's (see EngineCore._scheduler).
                sinks = (self._sink(i), self._note)
                pools.append(
                    VLLMKVCacheManager(
                        n, self.block_size, self.enable_prefix_caching, *sinks, cache_at_allocation=False
                    )
                )
            else:
                pools.append(
                    KVCacheManager(
                        n, self.block_size, self.enable_prefix_caching, self._sink(i), self._note, self.eviction_policy
                    )
                )
        for i in range(len(self.pools)):
            self._watch(i)
            self.pools[i].reset_prefix_cache()  # tells the router (AllBlocksCleared) that this pool forgot everything
            self._publish_activity(i)
        self.pools, self.requests = pools, [{} for _ in pools]
        self.last_replies = [None] * len(pools)
        previous, self.implementation = self.implementation, name
        self._swapped_in("kv_cache_manager", name, previous)
        return {"implementation": name, "previous": previous, "drained": True}

    def _roll_back(self, error: str) -> None:
        """A pool put its previous policy back after the new one failed (``BlockPool``): so do the others."""
        for manager in self.pools:
            manager.pool.eviction_error = None
            manager.pool.put_back_fallback()
        failed, self.eviction_policy = self.eviction_policy, self.previous_policy
        self._rolled_back("kv_cache_manager", self.eviction_policy, failed, error)

    def _publish_swapped(self, event: Swapped) -> None:
        if self.publisher is not None:
            self.publisher.publish("swap.kv_cache_manager", event)

    def kv_events_subscribed(self) -> bool:
        """Whether a subscriber (the router) takes every pool's KV events now: ZeroMQ drops what is
        published before a subscription arrives, so a router that missed them would route cold."""
        return self.publisher is not None and all(self.publisher.wants(f"worker.{i}") for i in range(len(self.pools)))

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "component": "kv_cache_manager",
            "kv_events_subscribed": self.kv_events_subscribed(),
            "implementation": self.implementation,
            "eviction_policy": self.eviction_policy,
            "last_swap_error": self.last_swap_error,
            "uptime_s": round(time.time() - self.started, 3),
            "num_pools": len(self.pools),
            "generations": list(self.generations),
        }

    def stats(self) -> dict[str, Any]:
        pools = []
        for manager, num_kv_events in zip(self.pools, self.pool_kv_events, strict=True):
            s = manager.stats()
            pools.append(
                {
                    "kv_blocks_total": s.num_blocks_total,
                    "kv_blocks_free": s.num_blocks_free,
                    "kv_blocks_cached": s.num_blocks_cached,
                    "kv_cache_usage": s.usage,
                    "prefix_cache_queries": s.prefix_cache_queries,
                    "prefix_cache_hits": s.prefix_cache_hits,
                    "num_evictions": s.num_evictions,
                    "num_requests_holding_blocks": len(manager.held_req_ids()),
                    "num_kv_events": num_kv_events,
                }
            )
        calls = {"num_calls": self.num_calls, "num_ops": self.num_ops}
        return {"pools": pools, **calls, "num_kv_events": self.num_kv_events}

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
