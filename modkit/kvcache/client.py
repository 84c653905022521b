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

The scheduler's admissions of waiting requests travel together: ``prepare_admissions``
hands the client the requests the scheduler is about to admit, in order, and the token
budget; the client sends a run of them as ``KVAdmit`` ops (each the prefix-cache lookup,
then the allocation for what the ones before left of the budget; the service stops at the
first that does not fit), as many as the budget could cover with no prefix hit, and answers
the scheduler's ``get_computed_blocks`` and ``allocate_slots`` calls from the reply. When
prefix hits leave budget over, the next call sends the next run. An allocation the free
count cannot vouch for is one round trip of its own.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from modkit.kvcache.interface import BlockHandles, KVRequest
from modkit.protocol import KVAdmit, KVAllocate, KVCacheComputed, KVFree, KVGetComputed, KVOp
from modkit.transport import RemoteError, RpcClient, RpcTimeoutError

APPLY_TIMEOUT_S = 2.0  # an apply takes milliseconds: this long without a reply, the manager is asked if it lives
PING_TIMEOUT_S = 0.5
MAX_APPLY_ATTEMPTS = 3  # to a manager that answers pings but not the apply (a slow one)
REJOIN_INTERVAL_S = 0.25  # while lost: how often the manager is tried again
REJOIN_TIMEOUT_S = 0.25


class KVCacheLost(RuntimeError):
    """The KV cache manager lost this pool's state (or cannot be reached): nothing held there is known."""

    def __init__(self, pool: int, why: str) -> None:
        super().__init__(f"KV cache pool {pool}: {why}")
        self.pool, self.why = pool, why


@dataclass(slots=True)
class _Admissions:
    """The waiting requests the scheduler is admitting this step (``prepare_admissions``)."""

    requests: list[KVRequest]
    position: dict[str, int]  # req_id -> index in requests
    budget_left: int  # of the token budget, after the runs sent so far
    # req_id -> the service's answer: (block ids gained, tokens hit, tokens to compute), or None: refused
    answers: dict[str, tuple[list[int], int, int] | None] = field(default_factory=dict)


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
        self._admissions: _Admissions | None = None
        self.generation: str | None = None  # the pool is ours once reset under it (``_join``)
        self.manager_pid: int | None = None  # of the manager the generation lives in
        self.lost: str | None = None  # why the manager's state was lost; None while it is not
        self.num_lost = 0
        self._seq = 0
        self._next_rejoin = 0.0

    # -- admissions: one round trip for a run of them ---------------------------------------

    def prepare_admissions(self, requests: Sequence[KVRequest], token_budget: int) -> None:
        self._end_admissions()
        if requests:
            position = {r.req_id: i for i, r in enumerate(requests)}
            self._admissions = _Admissions(list(requests), position, token_budget)

    def _admitting(self, request: KVRequest) -> bool:
        """Whether ``request`` is one of the prepared admissions, not yet claimed."""
        return self._admissions is not None and request.req_id in self._admissions.position

    def _answer(self, request: KVRequest) -> tuple[list[int], int, int] | None:
        """The service's answer for a request being admitted, sending its run first if need be."""
        admissions = self._admissions
        assert admissions is not None
        if request.req_id not in admissions.answers:
            self._send_admission_run(admissions, admissions.position[request.req_id])
        return admissions.answers[request.req_id]

    def _send_admission_run(self, admissions: _Admissions, start: int) -> None:
        """``KVAdmit`` ops for the requests from ``start`` on, as many as the budget left could
        cover with no prefix hit (more fit with hits: then the next run goes later)."""
        run: list[KVRequest] = []
        uncovered = admissions.budget_left
        for request in admissions.requests[start:]:
            run.append(request)
            uncovered -= request.num_tokens - request.num_computed_tokens
            if uncovered <= 0:
                break
        ops: list[KVOp] = [
            KVAdmit(r.req_id, self._new_tokens(r), r.num_computed_tokens, admissions.budget_left, follows=i > 0)
            for i, r in enumerate(run)
        ]
        results = self._apply(ops)[-len(ops) :]
        for request, result in zip(run, results, strict=True):
            if result is None:
                admissions.answers[request.req_id] = None
                continue
            block_ids, num_hit, num_new = result
            admissions.answers[request.req_id] = (list(block_ids), int(num_hit), int(num_new))
            admissions.budget_left -= int(num_new)

    def _end_admissions(self) -> None:
        """Admissions are over: every one the service made must have been claimed by the scheduler."""
        admissions, self._admissions = self._admissions, None
        if admissions is None:
            return
        unclaimed = [r for r, answer in admissions.answers.items() if answer is not None]
        if unclaimed:  # the two sides followed different rules: fail loudly rather than leak blocks
            raise RuntimeError(f"the KV cache manager admitted {unclaimed} but the scheduler did not ask for them")

    # -- the interface -----------------------------------------------------------------------

    def get_computed_blocks(self, request: KVRequest) -> tuple[list[int], int]:
        if self._admitting(request):
            answer = self._answer(request)
            if answer is None:
                return [], 0  # refused: allocate_slots says so; nothing was taken
            block_ids, num_hit, _ = answer
            return block_ids[: num_hit // self.block_size], num_hit
        op = KVGetComputed(request.req_id, self._new_tokens(request), request.num_computed_tokens)
        block_ids, num_hit = self._ask(op)
        return list(block_ids), int(num_hit)

    def allocate_slots(
        self,
        request: KVRequest,
        num_new_tokens: int,
        new_computed_blocks: BlockHandles = (),
        num_new_computed_tokens: int = 0,
    ) -> int | None:
        if self._admitting(request):
            return self._claim_admission(request, num_new_tokens, num_new_computed_tokens)
        held = self._blocks.get(request.req_id)
        if held is not None and not new_computed_blocks:
            total = request.num_computed_tokens + num_new_tokens
            num_needed = -(-total // self.block_size) - len(held) - self._num_promised(request.req_id)
            if num_needed <= 0:
                return 0  # room in the blocks it holds: the service would change nothing
            if num_needed <= self.num_free_blocks - self._num_promised_blocks:
                # The service's check passes for sure: queue it, and learn the ids with the next reply.
                self._promised.append((len(self._pending), request.req_id))
                new_tokens = self._new_tokens(request)
                op = KVAllocate(request.req_id, new_tokens, request.num_computed_tokens, num_new_tokens, [], 0)
                self._pending.append(op)
                self._num_promised_blocks += num_needed
                self.num_promised += 1
                self._promised_per_request[request.req_id] = self._num_promised(request.req_id) + num_needed
                return num_needed  # promised: get_block_ids has their ids once the reply is in
        hit_ids = list(cast("Sequence[int]", new_computed_blocks))  # block ids: get_computed_blocks gave them
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
        return len(new_ids)

    def _claim_admission(self, request: KVRequest, num_new_tokens: int, num_hit_tokens: int) -> int | None:
        """The scheduler's allocation for a prepared admission: what the service already did."""
        answer = self._answer(request)
        assert self._admissions is not None
        del self._admissions.answers[request.req_id], self._admissions.position[request.req_id]
        if answer is None:
            return None
        block_ids, num_hit, num_new = answer
        if (num_hit, num_new) != (num_hit_tokens, num_new_tokens):
            raise RuntimeError(
                f"{request.req_id}: the scheduler asked for {num_hit_tokens} hit + {num_new_tokens} new tokens, "
                f"the KV cache manager admitted {num_hit} + {num_new}"
            )
        self._blocks.setdefault(request.req_id, []).extend(block_ids)
        return len(block_ids) - num_hit // self.block_size

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
        self._end_admissions()
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
        """Send what is queued. A lost manager is only noted (``lost``): the scheduler rebuilds from there."""
        self._end_admissions()
        if self._pending and self.lost is None:
            with contextlib.suppress(KVCacheLost):
                self._apply([])

    # -- a lost KV cache manager ---------------------------------------------------------------

    def forget_all(self) -> None:
        """Forget every block table and queued call (the scheduler has requeued its requests)."""
        self._pending, self._promised, self._num_promised_blocks = [], [], 0
        self._promised_per_request.clear()
        self._sent.clear()
        self._blocks.clear()
        self._num_full_reported.clear()
        self._admissions = None
        self.usage, self.num_free_blocks = 0.0, 0

    def rejoin(self) -> bool:
        """While lost: reset the pool under a new generation if the manager answers (tried at most every
        ``REJOIN_INTERVAL_S``, waiting ``REJOIN_TIMEOUT_S``); True once it is ours again."""
        if self.lost is None:
            return True
        if time.monotonic() < self._next_rejoin:
            return False
        self._next_rejoin = time.monotonic() + REJOIN_INTERVAL_S
        assert not self._blocks and not self._pending, "forget_all() before rejoining"
        self.generation = None
        try:
            self._join(REJOIN_TIMEOUT_S)
        except (RpcTimeoutError, RemoteError):
            return False
        self.lost = None
        return True

    def _join(self, timeout_s: float) -> None:
        """Reset the pool under a new generation of ours (freeing whatever a scheduler before us held)."""
        generation = uuid.uuid4().hex
        pid = int(self.rpc.ping(timeout_s)["pid"])
        reply = self.rpc.invoke("reset", (self.pool, generation), timeout_s=timeout_s)
        self.generation, self.manager_pid = generation, pid
        self.usage, self.num_free_blocks = reply["usage"], reply["num_free_blocks"]

    def lose(self, why: str) -> KVCacheLost:
        """Note that the manager lost (or may have lost) this pool; the exception to raise, if the caller raises."""
        self.lost, self.num_lost = why, self.num_lost + 1
        self._next_rejoin = 0.0
        return KVCacheLost(self.pool, why)

    def _call_apply(self, batch: list[KVOp]) -> dict[str, Any]:
        """One apply, retried with the same sequence number while the manager answers pings; KVCacheLost if lost."""
        if self.lost is not None:
            raise KVCacheLost(self.pool, self.lost)
        try:
            if self.generation is None:
                self._join(APPLY_TIMEOUT_S)
            self._seq += 1
            for _ in range(MAX_APPLY_ATTEMPTS):
                try:
                    args = (self.pool, batch, self.generation, self._seq)
                    return cast("dict[str, Any]", self.rpc.invoke("apply", args, timeout_s=APPLY_TIMEOUT_S))
                except RpcTimeoutError:
                    pid = int(self.rpc.ping(PING_TIMEOUT_S)["pid"])
                    if pid != self.manager_pid:
                        raise self.lose(f"the KV cache manager restarted (pid {self.manager_pid} -> {pid})") from None
            raise self.lose(f"no reply to apply after {MAX_APPLY_ATTEMPTS} tries")
        except RpcTimeoutError as error:
            raise self.lose(f"the KV cache manager does not answer ({error})") from None
        except RemoteError as error:
            if error.type_name == "UnknownGeneration":
                raise self.lose(f"the KV cache manager lost this pool's blocks ({error.message})") from None
            raise

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
        reply = self._call_apply(batch)
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
