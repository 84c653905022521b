"""The scheduler's side of the KV cache manager process: ``KVCacheManagerClient``.

::

    scheduler process                                    KV cache manager process
    Scheduler -> KVCacheManagerClient(pool=i)  --apply(i, [ops])-->  KVCacheService (kvcache/service.py)
                                               <--KVApplyReply----     pools[i]: KVCacheManager

The client satisfies ``KVCacheManagerInterface``: the scheduler cannot tell it from an
in-process ``KVCacheManager``. It only remembers the block tables it was given
(``get_block_ids``), which ``check_invariants`` compares with the service's.

Cost: one ``apply`` per call that returns something, with the queued ``cache_blocks``
and ``free`` calls in front of it, in order; the scheduler flushes what is left when it
goes idle. The client answers two questions itself:

- a request whose held blocks already have room for its new tokens needs no new block (the
  manager would change nothing), which is most decode steps; nor does ``cache_blocks``
  travel before one of its blocks filled up;
- a running request that needs new blocks gets them *promised* when the free blocks of the
  last reply, less those promised since, cover them: the manager checks exactly that count
  (``num_needed <= num_free_blocks``), so its answer cannot be None. The allocation is
  queued, and its block ids arrive with the next reply, which ``get_block_ids`` forces:
  the scheduler asks for them once it has planned the whole step, so a step's block-boundary
  decodes cost one round trip together instead of one each.

A run of admissions (``admit_in_order``: for each waiting request in turn, the prefix-cache
lookup, then the allocation for what is left of the token budget, until one does not fit) is
one round trip, and so is an allocation the count cannot vouch for.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from modkit.kvcache.interface import KVRequest
from modkit.protocol import KVAdmit, KVAllocate, KVCacheComputed, KVFree, KVGetComputed, KVOp
from modkit.transport import RpcClient


class KVCacheManagerClient:
    """``KVCacheManagerInterface`` for the scheduler, backed by one pool of a ``KVCacheService``."""

    def __init__(self, rpc: RpcClient, pool: int, block_size: int) -> None:
        self.rpc, self.pool, self.block_size = rpc, pool, block_size
        self.usage = 0.0  # as of the last reply
        self.num_free_blocks = 0
        self.num_round_trips = 0
        self.round_trip_s = 0.0  # waited for replies, in all
        self.manager_s = 0.0  # of that, the manager working on the ops
        self.num_promised = 0  # allocations promised without a round trip of their own
        self._pending: list[KVOp] = []
        self._promised: list[tuple[int, str]] = []  # (index in _pending, req_id) of promised allocations
        self._num_promised_blocks = 0  # blocks promised since the last reply
        self._promised_per_request: dict[str, int] = {}
        self._sent: dict[str, int] = {}  # tokens of each request the service has seen
        self._blocks: dict[str, list[int]] = {}  # each request's block table, as the service handed it out
        self._num_full_reported: dict[str, int] = {}  # full blocks of each request cache_blocks has reported

    def admit_in_order(self, requests: Sequence[KVRequest], token_budget: int) -> list[tuple[int, int]]:
        """``modkit.kvcache.interface.admit_in_order`` in one round trip: each lookup and allocation."""
        ops: list[KVOp] = [
            KVAdmit(r.req_id, self._new_tokens(r), r.num_computed_tokens, token_budget, follows=i > 0)
            for i, r in enumerate(requests)
        ]
        results = self._apply(ops)[-len(ops) :] if ops else []
        admitted = []
        for request, result in zip(requests, results, strict=True):
            if result is None:  # not admitted: nor is any after it
                break
            block_ids, num_hit, num_new = result
            self._blocks.setdefault(request.req_id, []).extend(block_ids)
            admitted.append((int(num_hit), int(num_new)))
        return admitted

    def get_computed_blocks(self, request: KVRequest) -> tuple[list[int], int]:
        op = KVGetComputed(request.req_id, self._new_tokens(request), request.num_computed_tokens)
        block_ids, num_hit = self._ask(op)
        return list(block_ids), int(num_hit)

    def allocate_slots(
        self,
        request: KVRequest,
        num_new_tokens: int,
        new_computed_blocks: Sequence[Any] = (),
        num_new_computed_tokens: int = 0,
    ) -> list[int] | None:
        held = self._blocks.get(request.req_id)
        if held is not None and not new_computed_blocks:
            total = request.num_computed_tokens + num_new_tokens
            num_needed = -(-total // self.block_size) - len(held) - self._num_promised(request.req_id)
            if num_needed <= 0:
                return []  # room in the blocks it holds: the service would change nothing
            if num_needed <= self.num_free_blocks - self._num_promised_blocks:
                # The service's check passes for sure: queue it, and learn the ids with the next reply.
                self._promised.append((len(self._pending), request.req_id))
                new_tokens = self._new_tokens(request)
                op = KVAllocate(request.req_id, new_tokens, request.num_computed_tokens, num_new_tokens, [], 0)
                self._pending.append(op)
                self._num_promised_blocks += num_needed
                self.num_promised += 1
                self._promised_per_request[request.req_id] = self._num_promised(request.req_id) + num_needed
                return []  # promised: get_block_ids has them once the reply is in
        hit_ids = [int(b) for b in new_computed_blocks]
        op = KVAllocate(
            request.req_id,
            self._new_tokens(request),
            request.num_computed_tokens,
            num_new_tokens,
            hit_ids,
            num_new_computed_tokens,
        )
        new_ids = self._ask(op)
        if new_ids is None:
            return None
        self._blocks.setdefault(request.req_id, []).extend(hit_ids + new_ids)
        return list(new_ids)

    def cache_blocks(self, request: KVRequest, num_computed_tokens: int) -> None:
        if request.req_id not in self._blocks:
            return
        # Only when a block filled up since the last report: otherwise the manager would change
        # nothing (most decode steps), and the op would cost the round trip its encoding.
        num_full = min(num_computed_tokens, request.num_tokens) // self.block_size
        if num_full <= self._num_full_reported.get(request.req_id, 0):
            return
        self._num_full_reported[request.req_id] = num_full
        self._pending.append(KVCacheComputed(request.req_id, self._new_tokens(request), num_computed_tokens))

    def free(self, request: KVRequest) -> None:
        self._blocks.pop(request.req_id, None)
        self._num_full_reported.pop(request.req_id, None)
        if self._sent.pop(request.req_id, None) is not None:  # never sent: the service never heard of it
            self._pending.append(KVFree(request.req_id))

    def get_block_ids(self, req_id: str, start: int = 0) -> list[int]:
        if self._promised:
            self._apply([])  # the promised allocations' block ids
        return self._blocks.get(req_id, [])[start:]

    def held_req_ids(self) -> set[str]:
        if self._promised:
            self._apply([])
        return {r for r, blocks in self._blocks.items() if blocks}

    def _num_promised(self, req_id: str) -> int:
        return self._promised_per_request.get(req_id, 0)

    def flush(self) -> None:
        if self._pending:
            self._apply([])

    def check_invariants(self) -> None:
        """The service's invariants hold, and its block tables are exactly the ones this side uses."""
        self.flush()
        theirs = self.rpc.call("block_tables", self.pool)
        assert theirs == {r: b for r, b in self._blocks.items() if b}, "block tables differ from the KV manager's"
        self.rpc.call("check_invariants", self.pool)

    def _new_tokens(self, request: KVRequest) -> list[int]:
        sent = self._sent.get(request.req_id, 0)
        self._sent[request.req_id] = request.num_tokens
        return request.all_token_ids[sent:]

    def _ask(self, op: KVOp) -> Any:
        return self._apply([op])[-1]

    def _apply(self, ops: list[KVOp]) -> list[Any]:
        batch, self._pending = self._pending + ops, []
        promised, self._promised = self._promised, []
        self._num_promised_blocks = 0
        self._promised_per_request.clear()
        sent = time.perf_counter()
        reply: dict[str, Any] = self.rpc.call("apply", self.pool, batch)
        self.round_trip_s += time.perf_counter() - sent
        self.manager_s += reply["apply_s"]
        self.num_round_trips += 1
        self.usage, self.num_free_blocks = reply["usage"], reply["num_free_blocks"]
        results = list(reply["results"])
        for index, req_id in promised:
            new_ids = results[index]
            if new_ids is None:  # the free count vouched for it: the two sides disagree
                raise RuntimeError(f"the KV cache manager refused a promised allocation for {req_id}")
            if req_id in self._blocks:  # not freed since (a preemption later in the same step)
                self._blocks[req_id].extend(new_ids)
        return results
