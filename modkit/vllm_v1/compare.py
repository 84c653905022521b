"""Run modkit's scheduler and vLLM's on the same workload, in lockstep, and line their decisions up.

No model runs: each step both schedulers plan, and every request that reached the end of
its known tokens gets a token from ``next_token(req_id, position)``. Tokens depend only on
the request and the position, so both sides see the same token streams however
differently they batch them::

    workload [(arrival step, prompt ids, max_tokens), ...]
        step t: requests arriving at t join both    modkit Scheduler + KVCacheManager
                both schedule(), both get tokens     VLLMScheduler (vLLM's own, and its KV manager)
        --> requests: one row per (step, req_id) either side touched: tokens, preempted, hit tokens
            steps:    one row per step: totals of each side, and whether the step was identical
            summary:  steps to finish, preemptions, prefix hits, fraction of identical steps

A workload's requests have no eos: each generates exactly ``max_tokens`` tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modkit.kvcache import KVCacheManager
from modkit.request import Request
from modkit.sampling_params import SamplingParams
from modkit.scheduler import ModelRunnerOutput, Scheduler
from modkit.vllm_v1.scheduler import VLLMScheduler

if TYPE_CHECKING:
    import pandas as pd

    from modkit.trace import Trace

Workload = Sequence[tuple[int, list[int], int]]  # (arrival step, prompt token ids, max_tokens) per request
SIDES = ("modkit", "vllm")


def default_next_token(req_id: str, position: int) -> int:
    """A token that depends only on the request and the output position (so both sides agree)."""
    return (sum(map(ord, req_id)) * 7919 + position * 104_729) % 30_000 + 1


@dataclass(slots=True)
class SchedulerComparison:
    requests: pd.DataFrame  # step, req_id, {side}_tokens, {side}_preempted, {side}_hit, agree
    steps: pd.DataFrame  # step, {side}_tokens, {side}_running, {side}_kv_usage, identical
    summary: dict[str, Any]


def compare_schedulers(
    workload: Workload,
    num_blocks: int,
    block_size: int = 16,
    max_num_batched_tokens: int = 2048,
    max_num_seqs: int = 256,
    max_model_len: int = 2048,
    enable_prefix_caching: bool = True,
    next_token: Callable[[str, int], int] = default_next_token,
    check_invariants: bool = True,
    max_steps: int = 100_000,
) -> SchedulerComparison:
    """Feed ``workload`` to modkit's ``Scheduler`` and to ``VLLMScheduler`` with the same limits, step by step."""
    import pandas as pd

    limits = (max_num_batched_tokens, max_num_seqs, max_model_len)
    schedulers: dict[str, Scheduler | VLLMScheduler] = {
        "modkit": Scheduler(KVCacheManager(num_blocks, block_size, enable_prefix_caching), *limits),
        "vllm": VLLMScheduler(num_blocks, block_size, *limits, enable_prefix_caching=enable_prefix_caching),
    }
    # FCFS order must be the same on both sides: arrival step, then position in the workload.
    order = sorted(range(len(workload)), key=lambda i: (workload[i][0], i))
    # arrival_time is the position in that order, so both sides break ties alike.
    pending = [(workload[i][0], f"r{i}", list(workload[i][1]), workload[i][2], float(n)) for n, i in enumerate(order)]
    rows: list[dict[str, Any]] = []
    totals: list[dict[str, Any]] = []
    finished: dict[str, int] = {}
    step = 0
    while pending or any(s.has_unfinished_requests() for s in schedulers.values()):
        if step >= max_steps:
            raise RuntimeError(f"the workload did not finish in {max_steps} steps")
        while pending and pending[0][0] <= step:
            _, req_id, prompt, max_tokens, arrival = pending.pop(0)
            for scheduler in schedulers.values():
                params = SamplingParams(temperature=0, max_tokens=max_tokens)
                scheduler.add_request(Request(req_id, list(prompt), params, arrival_time=arrival))
        seen: dict[str, dict[str, Any]] = {}
        step_total: dict[str, Any] = {"step": step}
        for side, scheduler in schedulers.items():
            plan = scheduler.schedule()
            record = scheduler.last_record
            assert record is not None
            if check_invariants:
                scheduler.check_invariants()
            hits = {e.req_id: e.num_cached_tokens for e in record.scheduled}
            for req_id in [*plan.num_scheduled_tokens, *plan.preempted_req_ids]:
                row = seen.setdefault(req_id, {"step": step, "req_id": req_id})
                row[f"{side}_tokens"] = plan.num_scheduled_tokens.get(req_id, 0)
                row[f"{side}_preempted"] = req_id in plan.preempted_req_ids
                row[f"{side}_hit"] = hits.get(req_id, 0)
            step_total |= {
                f"{side}_tokens": plan.total_num_scheduled_tokens,
                f"{side}_running": record.num_running,
                f"{side}_kv_usage": record.kv_usage,
            }
            done = [r for r in plan.num_scheduled_tokens if _caught_up(scheduler.requests[r])]
            tokens = [next_token(r, scheduler.requests[r].num_output_tokens) for r in done]
            scheduler.update_from_output(plan, ModelRunnerOutput(done, tokens))
            if check_invariants:
                scheduler.check_invariants()
            if not pending and not scheduler.has_unfinished_requests():
                finished.setdefault(side, step + 1)
        for row in seen.values():
            for side in SIDES:
                row.setdefault(f"{side}_tokens", 0)
                row.setdefault(f"{side}_preempted", False)
                row.setdefault(f"{side}_hit", 0)
            row["agree"] = all(row[f"modkit_{k}"] == row[f"vllm_{k}"] for k in ("tokens", "preempted", "hit"))
        rows.extend(seen.values())
        step_total["identical"] = all(row["agree"] for row in seen.values())
        totals.append(step_total)
        step += 1

    requests = pd.DataFrame(rows, columns=_request_columns())
    steps = pd.DataFrame(totals)
    busy = steps[(steps["modkit_tokens"] > 0) | (steps["vllm_tokens"] > 0)]
    differing = steps.loc[~steps["identical"], "step"]
    summary: dict[str, Any] = {
        "num_requests": len(workload),
        "identical_step_fraction": float(busy["identical"].mean()) if len(busy) else 1.0,
        "first_difference_step": int(differing.iloc[0]) if len(differing) else None,
    }
    for side, scheduler in schedulers.items():
        summary[f"{side}_steps_to_finish"] = finished.get(side, step)
        summary[f"{side}_preemptions"] = scheduler.num_preemptions
        summary[f"{side}_prefix_hit_tokens"] = int(requests[f"{side}_hit"].sum())
    return SchedulerComparison(requests, steps, summary)


def _caught_up(request: Request) -> bool:
    """Whether the step just scheduled computes the request's last known token (so it samples one)."""
    return request.num_computed_tokens == request.num_tokens


def _request_columns() -> list[str]:
    per_side = [f"{side}_{k}" for k in ("tokens", "preempted", "hit") for side in SIDES]
    return ["step", "req_id", *per_side, "agree"]


def workload_from_trace(
    trace: Trace, step_s: float | None = None, vocab_size: int = 30_000, seed: int = 0
) -> list[tuple[int, list[int], int]]:
    """A workload shaped like a recorded ``modkit.trace.Trace``: its arrivals, prompt and output lengths.

    Arrival times become steps of ``step_s`` seconds (default: the trace's median step).
    A trace keeps how many prompt tokens hit the prefix cache, not which: a request that
    hit ``c`` tokens gets the first ``c`` tokens of one shared random prefix, so requests
    with hits share a prefix of the shorter length. Everything else is random (seeded).
    """
    frame = trace.requests.dropna(subset=["arrival", "num_prompt_tokens"]).sort_values("arrival")
    if step_s is None:
        durations = trace.steps.get("step_s", [])
        step_s = float(durations.median()) if len(durations) else 0.05
    rng = random.Random(seed)
    longest = int(frame["num_prompt_tokens"].max()) if len(frame) else 0
    shared = [rng.randrange(1, vocab_size) for _ in range(longest)]
    workload = []
    for row in frame.itertuples():
        num_prompt = int(row.num_prompt_tokens)
        cached = min(int(row.num_cached_tokens or 0), num_prompt - 1)
        prompt = shared[:cached] + [rng.randrange(1, vocab_size) for _ in range(num_prompt - cached)]
        outputs = row.num_output_tokens
        max_tokens = int(outputs) if outputs == outputs and outputs > 0 else 16  # NaN != NaN
        workload.append((int(row.arrival / step_s), prompt, max_tokens))
    return workload
