"""What the scheduler needs from a KV cache manager, in one process or behind ZeroMQ.

``KVCacheManager`` (this process) and ``KVCacheManagerClient`` (the KV cache manager
process, over RPC) both satisfy ``KVCacheManagerInterface``; the scheduler cannot tell
which one it holds. The contract:

- ``get_computed_blocks(request)`` -> (block handles, tokens they hold): the request's
  leading full blocks found in the prefix cache, at most ``num_tokens - 1`` tokens. The
  handles are opaque to the caller: it only passes them back to ``allocate_slots``.
- ``allocate_slots(request, n, hits, num_hit)`` -> the new blocks, or None (nothing
  changed) when too few blocks are free. The blocks of a request are exactly
  ``get_block_ids(req_id)``, which is what the worker's block table holds.
- ``cache_blocks(request, num_computed_tokens)``: after a forward, make its computed
  full blocks findable by hash. ``free(request)``: give all its blocks back.
- ``flush()``: make every earlier call take effect (a no-op in-process; a remote
  manager may batch the calls that return nothing).

The scheduler admits waiting requests with ``admit_in_order`` below: for each in turn, the
lookup, then the allocation for what the token budget allows, until one does not fit. A
manager in another process does a whole run of them in one round trip (its own
``admit_in_order``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from modkit.kvcache.hashing import BlockHash


class KVRequest(Protocol):
    """The parts of a request the KV cache manager reads (``modkit.request.Request`` has them)."""

    req_id: str
    num_computed_tokens: int
    all_token_ids: list[int]
    block_hashes: list[BlockHash]

    @property
    def num_tokens(self) -> int: ...


class KVCacheManagerInterface(Protocol):
    block_size: int

    @property
    def usage(self) -> float: ...

    def get_computed_blocks(self, request: KVRequest) -> tuple[Sequence[Any], int]: ...

    def allocate_slots(
        self,
        request: KVRequest,
        num_new_tokens: int,
        new_computed_blocks: Sequence[Any] = (),
        num_new_computed_tokens: int = 0,
    ) -> Sequence[Any] | None: ...

    def cache_blocks(self, request: KVRequest, num_computed_tokens: int) -> None: ...

    def free(self, request: KVRequest) -> None: ...

    def get_block_ids(self, req_id: str, start: int = 0) -> list[int]: ...

    def held_req_ids(self) -> set[str]: ...

    def flush(self) -> None: ...

    def check_invariants(self) -> None: ...


def admit_in_order(
    kv: KVCacheManagerInterface, requests: Sequence[KVRequest], token_budget: int
) -> list[tuple[int, int]]:
    """``admit`` each request in turn, each with what the ones before left of the budget, until
    one does not fit (too few free blocks) or the budget is used up; none after it is admitted.
    Returns (tokens hit, tokens to compute) for each admitted request: a prefix of ``requests``."""
    in_one_go = getattr(kv, "admit_in_order", None)  # a remote manager: one round trip for all
    if in_one_go is not None:
        results: list[tuple[int, int]] = in_one_go(requests, token_budget)
        return results
    admitted = []
    for request in requests:
        if token_budget <= 0:
            break
        result = admit(kv, request, token_budget)
        if result is None:
            break
        admitted.append(result)
        token_budget -= result[1]
    return admitted


def admit(kv: KVCacheManagerInterface, request: KVRequest, token_budget: int) -> tuple[int, int] | None:
    """Admit a waiting request: its prefix-cache hit, and blocks for the tokens it computes now
    (all the rest of it, or what the budget allows). Returns (tokens hit, tokens to compute),
    or None, changing nothing, when the free blocks do not suffice."""
    in_one_go = getattr(kv, "admit_in_order", None)  # a remote manager: one round trip for both
    if in_one_go is not None:
        result: list[tuple[int, int]] = in_one_go([request], token_budget)
        return result[0] if result else None
    hit_blocks, num_hit = kv.get_computed_blocks(request)
    num_new = min(request.num_tokens - num_hit, token_budget)
    if kv.allocate_slots(request, num_new, hit_blocks, num_hit) is None:
        return None
    return num_hit, num_new
