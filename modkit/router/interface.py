"""The contract of the router and of its routing policies.

With N workers, each with its own KV cache, the router sends each request to one of them::

    route(req_id, prompt_token_ids)
        block hashes of the prompt (the hashes the KV cache manager gives its full blocks)
        + a WorkerView per live worker --> policy.choose --> worker_id
    finish(req_id)                  the request no longer loads its worker
    on_kv_event(worker_id, event)   BlockStored / BlockRemoved / AllBlocksCleared from that
                                    worker's KV cache manager: which prefixes it caches now
    on_kv_snapshot(worker_id, hashes)  all of them at once, after events were lost

``modkit.router.Router`` satisfies ``RouterInterface``; ``RoundRobin``, ``LeastLoaded`` and
``KVAware`` (``modkit.router.policies``) satisfy ``RouterPolicyInterface``, and so does any
policy registered with ``register_router_policy``.

A policy may assume:

- ``workers`` are the live workers' views, never empty, in worker id order;
- ``block_hashes`` are the hashes of the prompt's full blocks, in order, and
  ``num_prompt_blocks`` counts every block the prompt fills, the last partial one too;
- a view's ``cached`` is what the router learned from events: it may lag behind the
  worker's cache (an event in flight), so a predicted prefix hit is a guess, never a promise.

It must return the ``worker_id`` of one of ``workers``; it may keep state of its own (a
turn, a random generator, its last costs for live views), but must not change the views.

The router guarantees:

1. a request counts on exactly one worker between ``route`` and ``finish``: routed again
   (it moved off a dead worker), it stops counting on the old one first;
2. a worker marked dead gets no request and forgets what it cached (its restarted cache
   is empty); with no live worker, ``route`` raises ``NoWorkerError``;
3. routing decides where a request runs, never whether: correctness does not depend on it,
   only prefix-cache hits and load balance do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from modkit.kvcache.events import KVEvent
from modkit.kvcache.hashing import BlockHash
from modkit.router.policies import WorkerView


@runtime_checkable
class RouterPolicyInterface(Protocol):
    """Chooses a worker for one request; see the module docstring for the contract."""

    def choose(self, block_hashes: list[BlockHash], num_prompt_blocks: int, workers: list[WorkerView]) -> int:
        """The id of the worker to send the request to; ``workers`` are the live ones, never empty."""
        ...


@runtime_checkable
class RouterInterface(Protocol):
    """Keeps a view of every worker and routes requests with a policy; see the module docstring."""

    @property
    def workers(self) -> dict[int, WorkerView]:
        """A view per worker, live or dead, by worker id."""
        ...

    @property
    def policy(self) -> RouterPolicyInterface:
        """The policy that chooses; a service may swap it between requests."""
        ...

    def route(self, request_id: str, prompt_token_ids: Sequence[int]) -> int:
        """Choose a live worker for a request and count it there until ``finish``."""
        ...

    def finish(self, request_id: str) -> None:
        """The request is done or aborted: it no longer loads its worker. Unknown ids are ignored."""
        ...

    def on_kv_event(self, worker_id: int, event: KVEvent) -> None:
        """Learn from a worker's KV cache manager which block hashes it caches now."""
        ...

    def on_kv_snapshot(self, worker_id: int, block_hashes: Iterable[BlockHash]) -> None:
        """Replace what is known of a worker's cache with every block hash it caches (a snapshot)."""
        ...

    def mark_dead(self, worker_id: int) -> None:
        """Stop routing to a worker, and forget what it cached."""
        ...

    def mark_alive(self, worker_id: int) -> None:
        """Route to a worker again."""
        ...
