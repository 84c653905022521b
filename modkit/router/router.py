"""The router: picks a worker for each request among N, each with its own KV cache.

It keeps a ``WorkerView`` per worker: whether it is alive, the requests it routed there
and the blocks they hold (its load), and which block hashes that worker caches, learned
from the worker's KV events (``BlockStored`` adds hashes, ``BlockRemoved`` drops them,
``AllBlocksCleared`` forgets them all), or all at once from a snapshot when events were
lost. A policy then chooses. A worker marked dead gets no more requests; if every worker is
dead, routing fails with ``NoWorkerError``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from modkit.kvcache.events import KVEvent, apply_kv_event
from modkit.kvcache.hashing import BlockHash, hash_request_blocks
from modkit.router.policies import RouterPolicy, WorkerView, get_router_policy


class NoWorkerError(RuntimeError):
    """No live worker can take the request."""


class Router:
    def __init__(
        self,
        num_workers: int,
        block_size: int,
        policy: str | RouterPolicy = "round_robin",
        routed_to: Sequence[int] | None = None,
    ) -> None:
        """``routed_to``: the workers requests go to (disaggregation: the decode workers); None: all."""
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.block_size = block_size
        self.policy = get_router_policy(policy) if isinstance(policy, str) else policy
        self.workers = {i: WorkerView(i) for i in range(num_workers)}
        self.routed_to = set(range(num_workers) if routed_to is None else routed_to)
        self._routed: dict[str, tuple[int, int]] = {}  # request id -> (worker id, blocks counted)
        self.decisions: Counter[int] = Counter()
        # What the last decision saw, per live worker: (prompt blocks cached there, blocks held there).
        self.last_seen: dict[int, tuple[int, int]] = {}

    def route(self, request_id: str, prompt_token_ids: Sequence[int]) -> int:
        """Choose a worker for a request and count it there until ``finish`` is called.

        A request routed again (it moved off a dead worker) stops counting on its old one.
        """
        self.finish(request_id)
        live = [w for w in self.workers.values() if w.alive and w.worker_id in self.routed_to]
        if not live:
            raise NoWorkerError("no live worker to route to")
        hashes = hash_request_blocks(prompt_token_ids, self.block_size, [])
        num_blocks = -(-len(prompt_token_ids) // self.block_size)
        self.last_seen = {w.worker_id: (w.prefix_hit_blocks(hashes), w.active_blocks) for w in live}
        worker_id = self.policy.choose(hashes, num_blocks, live)
        worker = self.workers[worker_id]
        worker.num_active_requests += 1
        worker.active_blocks += num_blocks
        self._routed[request_id] = (worker_id, num_blocks)
        self.decisions[worker_id] += 1
        return worker_id

    def finish(self, request_id: str) -> None:
        """The request is done (or aborted): it no longer loads its worker."""
        routed = self._routed.pop(request_id, None)
        if routed is not None:
            worker = self.workers[routed[0]]
            worker.num_active_requests -= 1
            worker.active_blocks -= routed[1]

    def on_kv_event(self, worker_id: int, event: KVEvent) -> None:
        apply_kv_event(self.workers[worker_id].cached, event)

    def on_kv_snapshot(self, worker_id: int, block_hashes: Iterable[BlockHash]) -> None:
        """What the worker caches, all of it at once (after KV events were lost): replaces what was known."""
        self.workers[worker_id].cached = set(block_hashes)

    def mark_dead(self, worker_id: int) -> None:
        """Stop routing to a worker (its process died or stopped answering)."""
        self.workers[worker_id].alive = False
        self.workers[worker_id].cached.clear()

    def mark_alive(self, worker_id: int) -> None:
        self.workers[worker_id].alive = True
