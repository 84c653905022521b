"""The one swap mechanism (``modkit.guard``) on each of the five swappable parts, in-process:
a candidate that fails on its third call is answered for by its fallback, from that call on,
and the answers are the fallback's own; the trial refuses before anything is installed; the
owner's rollback publishes one ``Swapped`` event and sets ``last_swap_error``."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from modkit.attention.interface import metadata_from_lengths
from modkit.attention.torch_ref import TorchReferenceAttention
from modkit.guard import SwapOwner, failure, in_charge, put_back, trial
from modkit.kvcache import KVCacheBlock, KVCacheManager, LFUEviction, LRUEviction
from modkit.kvcache.block_pool import BlockPool
from modkit.kvcache.eviction import GuardedEviction
from modkit.kvcache.hashing import BlockHash
from modkit.request import Request
from modkit.router import Router
from modkit.router.policies import GuardedRouterPolicy, LeastLoaded, RoundRobin, WorkerView
from modkit.sampler import DefaultSampler, SamplerOutput, SamplingState
from modkit.sampler.swaps import GuardedSampler
from modkit.sampling_params import SamplingParams
from modkit.scheduler.policies import FCFSPolicy, GuardedPolicy, SchedulingPolicy, ShortestJobFirstPolicy
from modkit.trace.events import Swapped
from modkit.worker.swaps import GuardedAttention

FAILING_CALL = 3


class Counter:
    """Counts calls; the FAILING_CALL-th and every later one raise (state broken for good)."""

    def __init__(self) -> None:
        self.calls = 0

    def tick(self) -> None:
        self.calls += 1
        if self.calls >= FAILING_CALL:
            raise RuntimeError(f"broke on call {self.calls}")


def requests(n: int) -> list[Request]:
    """Requests of decreasing length, arriving in order: SJF and FCFS disagree on every pair."""
    return [
        Request(f"r{i}", list(range(1, 20 - 2 * i)), SamplingParams(max_tokens=4), arrival_time=float(i))
        for i in range(n)
    ]


# -- scheduling policy --------------------------------------------------------------------------


class SJFBreaksOnItsThirdKey(ShortestJobFirstPolicy):
    def __init__(self) -> None:
        self.counter = Counter()

    def admission_key(self, request: Request) -> tuple[float, ...]:
        self.counter.tick()
        return super().admission_key(request)


def test_a_policy_that_fails_on_its_third_call_is_answered_for_by_its_fallback() -> None:
    candidate, fallback = SJFBreaksOnItsThirdKey(), FCFSPolicy()
    guard = GuardedPolicy(candidate, fallback)
    batch = requests(5)
    keys = [guard.admission_key(r) for r in batch]
    assert keys[:2] == [ShortestJobFirstPolicy().admission_key(r) for r in batch[:2]]
    assert keys[2:] == [fallback.admission_key(r) for r in batch[2:]], "the failing call and every later one"
    assert candidate.counter.calls == FAILING_CALL, "once failed, the candidate is not called again"
    error = failure(guard)
    assert error is not None and error.startswith("RuntimeError in admission_key(): broke on call 3")
    assert in_charge(guard) is candidate and put_back(guard) is fallback
    assert in_charge(fallback) is fallback and put_back(fallback) is fallback and failure(fallback) is None


def test_a_victim_that_is_not_running_counts_as_a_failure() -> None:
    class PicksAStranger(FCFSPolicy):
        def pick_victim(self, running: list[Request]) -> Request:
            return requests(1)[0]  # equal fields, another object: not one of them

    running = requests(3)
    guard = GuardedPolicy(PicksAStranger(), FCFSPolicy())
    assert guard.pick_victim(running) is FCFSPolicy().pick_victim(running)
    assert guard.failed and "not one of the running requests" in str(guard.error)


# -- eviction policy ------------------------------------------------------------------------------


class LRUBreaksOnItsThirdPop(LRUEviction):
    def __init__(self) -> None:
        super().__init__()
        self.counter = Counter()

    def pop(self) -> KVCacheBlock:
        self.counter.tick()
        return super().pop()


def test_an_eviction_policy_that_fails_mid_allocation_hands_out_what_lru_would() -> None:
    reference = BlockPool(1 + 8, 4)
    pool = BlockPool(1 + 8, 4)
    pool.set_eviction_policy(LRUBreaksOnItsThirdPop, keep_fallback=True)
    assert isinstance(pool.eviction, GuardedEviction) and pool.fallback_policy is LRUEviction
    held = pool.get_new_blocks(5)  # the third pop fails: LRU, filled from the pool's ground truth, goes on
    assert [b.block_id for b in held] == [b.block_id for b in reference.get_new_blocks(5)]
    assert type(pool.eviction) is LRUEviction and pool.fallback_policy is None, "put back at once"
    assert pool.eviction_error == "LRUBreaksOnItsThirdPop: RuntimeError in pop(): broke on call 3"
    pool.free_blocks(held)
    assert [b.block_id for b in pool.eviction] == [b.block_id for b in pool.free_block_list()]
    assert len(pool.get_new_blocks(8)) == 8, "every block once: none lost, none twice"


class LFUBreaksOnItsThirdAdd(LFUEviction):
    def __init__(self) -> None:
        super().__init__()
        self.counter = Counter()

    def add(self, block: KVCacheBlock) -> None:
        self.counter.tick()
        super().add(block)


def test_a_policy_that_fails_while_blocks_are_freed_leaves_the_pool_whole() -> None:
    manager = KVCacheManager(1 + 8, 4)
    request = Request("a", list(range(1, 27)), SamplingParams(max_tokens=1))
    assert manager.allocate_slots(request, request.num_tokens) is not None  # 7 of the 8 blocks
    manager.pool.set_eviction_policy(LFUBreaksOnItsThirdAdd, keep_fallback=True)  # its first add: the free one
    manager.free(request)  # seven blocks come back: its third add fails, on the second of them
    assert type(manager.pool.eviction) is LRUEviction and "in add()" in str(manager.pool.eviction_error)
    manager.check_invariants()


def test_the_pool_calls_the_policy_in_charge_and_nothing_else() -> None:
    # The guard is the policy object: a pool with no swap has a plain policy, and a swap rolled
    # back in another pool (put_back_fallback) leaves a plain one too.
    pool = BlockPool(1 + 4, 4)
    assert type(pool.eviction) is LRUEviction
    pool.set_eviction_policy(LFUEviction, keep_fallback=True)
    pool.put_back_fallback()
    assert type(pool.eviction) is LRUEviction and pool.eviction_error is None


# -- routing policy -------------------------------------------------------------------------------


class LeastLoadedBreaksOnItsThirdChoice(LeastLoaded):
    def __init__(self) -> None:
        self.counter = Counter()

    def choose(self, block_hashes: list[BlockHash], num_prompt_blocks: int, workers: list[WorkerView]) -> int:
        self.counter.tick()
        return super().choose(block_hashes, num_prompt_blocks, workers)


def test_a_routing_policy_that_fails_routes_like_its_fallback() -> None:
    def route_all(router: Router) -> list[int]:
        return [router.route(f"r{i}", list(range(40))) for i in range(6)]

    reference = Router(3, 16, RoundRobin())
    expected = route_all(reference)
    fallback = RoundRobin()
    router = Router(3, 16, GuardedRouterPolicy(LeastLoadedBreaksOnItsThirdChoice(), fallback))
    routed = route_all(router)
    assert routed[:2] == [0, 1]  # least loaded, ties to the lowest id: what round robin does too
    assert routed[2:] == expected[:4], "the fallback's own turns, from the failing call on"
    assert failure(router.policy) is not None and put_back(router.policy) is fallback


# -- sampler ------------------------------------------------------------------------------------


class SamplerBreaksOnItsThirdStep(DefaultSampler):
    def __init__(self, seed: int | None = None) -> None:
        super().__init__(seed)
        self.counter = Counter()

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
        self.counter.tick()
        return super().sample(logits, states)


def test_a_sampler_that_fails_is_answered_for_by_its_fallback() -> None:
    guard = GuardedSampler(SamplerBreaksOnItsThirdStep(seed=0), DefaultSampler(seed=0))
    greedy = [SamplingState.create(SamplingParams(temperature=0), [1, 2], "cpu") for _ in range(3)]
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        logits = torch.randn(3, 50, generator=generator)  # (N, V)
        tokens = guard.sample(logits, greedy).to_lists()
        assert [t.token_id for t in tokens] == logits.argmax(dim=-1).tolist()
        assert guard.failed == (step + 1 >= FAILING_CALL)
    assert not guard.can_sample_ahead(greedy), "a guarded sampler never samples ahead"


def test_token_ids_outside_the_vocabulary_count_as_a_failure() -> None:
    class OutOfVocabulary(DefaultSampler):
        def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
            output = super().sample(logits, states)
            output.sampled_token_ids += logits.shape[1]
            return output

    guard = GuardedSampler(OutOfVocabulary(seed=0), DefaultSampler(seed=0))
    logits = torch.randn(2, 10)
    states = [SamplingState.create(SamplingParams(temperature=0), [1], "cpu") for _ in range(2)]
    assert [t.token_id for t in guard.sample(logits, states).to_lists()] == logits.argmax(dim=-1).tolist()
    assert "outside the vocabulary" in str(guard.error)


# -- attention backend --------------------------------------------------------------------------


class AttentionBreaksOnItsThirdLayer(TorchReferenceAttention):
    def __init__(self) -> None:
        self.counter = Counter()

    def forward(self, query, key, value, kv_cache, metadata, scale):  # type: ignore[no-untyped-def]
        self.counter.tick()
        return super().forward(query, key, value, kv_cache, metadata, scale)


def test_an_attention_backend_that_fails_is_answered_for_by_its_fallback() -> None:
    heads, head_dim, block_size = 2, 8, 4
    metadata = metadata_from_lengths([(0, 5), (0, 3)], [[1, 2], [3]], block_size, "cpu")
    generator = torch.Generator().manual_seed(0)
    fallback = TorchReferenceAttention()
    guard = GuardedAttention(AttentionBreaksOnItsThirdLayer(), fallback)
    assert guard.name == "torch_ref"
    for layer in range(4):  # each call, as one layer of a step
        q, k, v = (torch.randn(8, heads, head_dim, generator=generator) for _ in range(3))  # (T, H, D)
        cache, expected_cache = (torch.zeros(2, 4, block_size, heads, head_dim) for _ in range(2))
        out = guard.forward(q, k, v, cache, metadata, head_dim**-0.5)
        expected = fallback.forward(q, k, v, expected_cache, metadata, head_dim**-0.5)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(cache, expected_cache)
        assert guard.failed == (layer + 1 >= FAILING_CALL)


# -- trial and rollback -------------------------------------------------------------------------


class Owner(SwapOwner):
    """An owner with one part, that keeps its events."""

    def __init__(self) -> None:
        self.implementation = self.previous = "fcfs"
        self.last_swap_error: str | None = None
        self.events: list[Swapped] = []
        self.policy: SchedulingPolicy = FCFSPolicy()

    def swap(self, name: str, candidate: SchedulingPolicy) -> None:
        trial(candidate, lambda p: [p.admission_key(r) for r in requests(3)])
        self.policy = GuardedPolicy(candidate, in_charge(self.policy))
        self.previous, self.implementation = self.implementation, name
        self._swapped_in("scheduler", name, self.previous)

    def check(self) -> None:
        error = failure(self.policy)
        if error is not None:
            self.policy = put_back(self.policy)
            failed, self.implementation = self.implementation, self.previous
            self._rolled_back("scheduler", self.implementation, failed, error)

    def _publish_swapped(self, event: Swapped) -> None:
        self.events.append(event)


def test_the_trial_refuses_before_anything_changes_and_a_rollback_is_reported() -> None:
    owner = Owner()
    with pytest.raises(RuntimeError, match="broke on call 3"):
        owner.swap("sjf", SJFBreaksOnItsThirdKey())  # the probe orders three requests
    assert owner.implementation == "fcfs" and type(owner.policy) is FCFSPolicy and owner.events == []

    class FailsLater(SJFBreaksOnItsThirdKey):
        def __init__(self) -> None:
            super().__init__()
            self.counter.calls = -3  # passes the trial's three calls, then two more

    owner.swap("sjf", FailsLater())
    assert [(e.implementation, e.previous, e.error) for e in owner.events] == [("sjf", "fcfs", None)]
    keys = [owner.policy.admission_key(r) for r in requests(4)]
    owner.check()
    assert keys[3] == FCFSPolicy().admission_key(requests(4)[3])
    assert type(owner.policy) is FCFSPolicy and owner.implementation == "fcfs"
    assert owner.last_swap_error == "RuntimeError in admission_key(): broke on call 3"
    last = owner.events[-1]
    assert (last.component, last.implementation, last.previous, last.error) == (
        "scheduler",
        "fcfs",
        "sjf",
        owner.last_swap_error,
    )
