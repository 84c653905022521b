"""Routing policies: which worker gets a request.

Each policy sees the same ``WorkerView``s (what the router knows of each live worker) and
the request's prompt block hashes, and returns one worker id. Register new policies with
``register_router_policy``; the pipeline config names one (``router_policy``).
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from modkit.guard import Guarded
from modkit.kvcache.hashing import BlockHash
from modkit.registry import Registry


@dataclass(slots=True)
class WorkerView:
    """What the router knows of one worker."""

    worker_id: int
    alive: bool = True
    num_active_requests: int = 0  # routed here and not finished
    active_blocks: int = 0  # KV blocks those requests hold, as the router estimates them
    cached: set[BlockHash] = field(default_factory=set)  # learned from the worker's KV events

    def prefix_hit_blocks(self, block_hashes: list[BlockHash]) -> int:
        """How many leading blocks of a prompt this worker holds in its prefix cache."""
        hits = 0
        for block_hash in block_hashes:
            if block_hash not in self.cached:
                break
            hits += 1
        return hits


class RouterPolicy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def choose(self, block_hashes: list[BlockHash], num_prompt_blocks: int, workers: list[WorkerView]) -> int:
        """The id of the worker to send the request to; ``workers`` are the live ones, never empty."""


class GuardedRouterPolicy(Guarded[RouterPolicy], RouterPolicy):
    """A routing policy swapped in live, with the one it replaced as its fallback (``modkit.guard``).

    If the new policy raises, or names a worker that is not live, the fallback routes that
    request, and the router's owner puts the fallback back.
    """

    def choose(self, block_hashes: list[BlockHash], num_prompt_blocks: int, workers: list[WorkerView]) -> int:
        return self.guarded("choose", lambda p: _live(p.choose(block_hashes, num_prompt_blocks, workers), workers))


def _live(worker_id: int, workers: list[WorkerView]) -> int:
    if all(w.worker_id != worker_id for w in workers):
        raise ValueError(f"returned worker {worker_id!r}, which is not live")
    return worker_id


def try_router_policy(policy: RouterPolicy, workers: list[WorkerView]) -> None:
    """The trial: route an empty prompt among the live ``workers``; raises unless it names one of them."""
    if workers:
        _live(policy.choose([], 0, workers), workers)


ROUTER_POLICIES: Registry[RouterPolicy] = Registry("router policy")
register_router_policy = ROUTER_POLICIES.register


def get_router_policy(name: str) -> RouterPolicy:
    return ROUTER_POLICIES.get(name)()


@register_router_policy("round_robin")
class RoundRobin(RouterPolicy):
    """Each live worker in turn, whatever it holds."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, block_hashes: list[BlockHash], num_prompt_blocks: int, workers: list[WorkerView]) -> int:
        worker = workers[self._next % len(workers)]
        self._next += 1
        return worker.worker_id


@register_router_policy("least_loaded")
class LeastLoaded(RouterPolicy):
    """The worker with the fewest requests in flight (ties: the lowest id)."""

    def choose(self, block_hashes: list[BlockHash], num_prompt_blocks: int, workers: list[WorkerView]) -> int:
        return min(workers, key=lambda w: (w.num_active_requests, w.worker_id)).worker_id


@register_router_policy("kv_aware")
class KVAware(RouterPolicy):
    """NVIDIA Dynamo's KV-aware cost: ``w * prefill_blocks + decode_blocks``, lowest wins.

    ``prefill_blocks``: prompt blocks the worker would have to compute (not in its prefix
    cache); ``decode_blocks``: blocks its running requests already hold (its load). With
    ``temperature > 0`` the worker is drawn from a softmax over negative costs instead, which
    spreads load when costs are close.
    """

    def __init__(self, prefill_weight: float = 1.0, temperature: float = 0.0, seed: int = 0) -> None:
        self.prefill_weight = prefill_weight
        self.temperature = temperature
        self._rng = random.Random(seed)
        self.last_costs: dict[int, float] = {}  # of the last decision, for live views

    def choose(self, block_hashes: list[BlockHash], num_prompt_blocks: int, workers: list[WorkerView]) -> int:
        self.last_costs = {
            w.worker_id: self.prefill_weight * (num_prompt_blocks - w.prefix_hit_blocks(block_hashes)) + w.active_blocks
            for w in workers
        }
        if self.temperature <= 0:
            return min(self.last_costs, key=lambda wid: (self.last_costs[wid], wid))
        best = min(self.last_costs.values())
        weights = [math.exp(-(c - best) / self.temperature) for c in self.last_costs.values()]
        return self._rng.choices(list(self.last_costs), weights)[0]
