"""Workloads to replay through schedulers without a model: written by hand, random, or shaped like a recorded run.

A workload is a list of requests, each with the step it arrives at, its prompt token ids and
how many tokens it generates (there is no eos: each generates exactly ``max_tokens``), plus
the limits of the engine it is replayed on (KV blocks, block size, token budget). Everything
is deterministic: the same workload gives the same steps every time, on any machine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modkit.trace import Trace


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    req_id: str
    arrival_step: int  # joins the waiting queue just before this step is planned
    prompt_token_ids: tuple[int, ...]
    max_tokens: int  # it generates exactly this many tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True, slots=True)
class Workload:
    """Requests, and the engine limits they are replayed under (each side of a comparison gets its own pool)."""

    requests: tuple[WorkloadRequest, ...]
    num_blocks: int  # KV blocks of the pool, the reserved null block included (as ``KVCacheManager`` counts)
    block_size: int = 16
    max_num_batched_tokens: int = 64
    max_num_seqs: int = 256
    max_model_len: int = 1024
    description: str = ""

    def __post_init__(self) -> None:
        ids = [r.req_id for r in self.requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique")
        for r in self.requests:
            if not r.prompt_token_ids or r.max_tokens < 1 or r.arrival_step < 0:
                raise ValueError(f"{r.req_id}: needs a prompt, max_tokens >= 1 and arrival_step >= 0")
            if r.num_prompt_tokens + r.max_tokens > self.max_model_len:
                raise ValueError(f"{r.req_id}: prompt + max_tokens exceeds max_model_len={self.max_model_len}")
            if r.num_prompt_tokens + r.max_tokens > (self.num_blocks - 1) * self.block_size:
                raise ValueError(
                    f"{r.req_id}: needs more KV blocks than the pool's {self.num_blocks - 1}: it never fits"
                )

    @classmethod
    def of(
        cls, requests: Sequence[tuple[str, int, int | Sequence[int], int]], num_blocks: int, **limits: Any
    ) -> Workload:
        """A workload written by hand: ``(req_id, arrival_step, prompt, max_tokens)`` per request, where
        ``prompt`` is a list of token ids or a length (the ids are then made up, distinct per request)."""
        made = []
        for req_id, arrival, prompt, max_tokens in requests:
            ids = _made_up_prompt(req_id, prompt) if isinstance(prompt, int) else tuple(prompt)
            made.append(WorkloadRequest(req_id, arrival, ids, max_tokens))
        return cls(tuple(made), num_blocks, **limits)

    def with_limits(self, **limits: Any) -> Workload:
        """The same requests under other limits (``num_blocks=24``, ``max_num_batched_tokens=32`` ...)."""
        return replace(self, **limits)

    def __len__(self) -> int:
        return len(self.requests)

    def __str__(self) -> str:
        total = sum(r.num_prompt_tokens for r in self.requests)
        outputs = sum(r.max_tokens for r in self.requests)
        last = max((r.arrival_step for r in self.requests), default=0)
        return (
            f"{len(self.requests)} requests arriving over steps 0-{last} "
            f"({total} prompt tokens, {outputs} to generate); "
            f"{self.num_blocks - 1} KV blocks of {self.block_size}, budget {self.max_num_batched_tokens} tokens/step"
            + (f"; {self.description}" if self.description else "")
        )


def _made_up_prompt(req_id: str, length: int) -> tuple[int, ...]:
    rng = random.Random(f"prompt:{req_id}")
    return tuple(rng.randrange(1, 30_000) for _ in range(length))


def synthetic_workload(
    num_requests: int = 12,
    seed: int = 0,
    shared_prefix_len: int = 48,
    share_fraction: float = 0.5,
    prompt_len: tuple[int, int] = (8, 120),
    max_tokens: tuple[int, int] = (4, 24),
    arrival_steps: int = 20,
    num_blocks: int = 40,
    **limits: Any,
) -> Workload:
    """Random requests (seeded): some start with one shared prefix (prefix-cache hits), prompts of
    ``prompt_len`` tokens after it, arrivals spread over the first ``arrival_steps`` steps."""
    rng = random.Random(seed)
    shared = [rng.randrange(1, 30_000) for _ in range(shared_prefix_len)]
    requests = []
    for i in range(num_requests):
        own = [rng.randrange(1, 30_000) for _ in range(rng.randint(*prompt_len))]
        prompt = (shared + own) if rng.random() < share_fraction else own
        arrival = rng.randrange(arrival_steps) if arrival_steps > 0 else 0
        requests.append(WorkloadRequest(f"r{i}", arrival, tuple(prompt), rng.randint(*max_tokens)))
    requests.sort(key=lambda r: (r.arrival_step, int(r.req_id[1:])))
    description = f"synthetic, seed {seed}"
    return Workload(tuple(requests), num_blocks, description=description, **limits)


def workload_from_trace(trace: Trace, worker_id: int | None = None, seed: int = 0) -> Workload:
    """A workload shaped like a recorded run: the trace's requests, prompt and output lengths,
    arrivals, and the limits of the pipeline that recorded it (``trace.meta``).

    A request arrives at the step of its worker that started first after it arrived (requests
    queued before the first step all arrive at step 0). A trace keeps how many prompt tokens
    hit the prefix cache, not which tokens: a request that hit ``c`` tokens gets the first ``c``
    tokens of one shared random prefix, so the hits come back in the replay; the other tokens
    are random (seeded). Only one worker's requests (the first worker's by default), named
    ``r0``, ``r1`` ... in the order they arrived.
    """
    requests, steps, meta = trace.requests, trace.steps, trace.meta
    if worker_id is None:
        worker_id = int(requests["worker_id"].dropna().min()) if requests["worker_id"].notna().any() else 0
    mine = requests[(requests["worker_id"] == worker_id) & requests["num_prompt_tokens"].notna()]
    mine = mine.sort_values("arrival", kind="stable")
    starts = sorted(steps.loc[steps["worker_id"] == worker_id, "start"]) if len(steps) else []
    rng = random.Random(seed)
    longest = int(mine["num_prompt_tokens"].max()) if len(mine) else 0
    shared = [rng.randrange(1, 30_000) for _ in range(longest)]
    made = []
    for i, row in enumerate(mine.itertuples()):
        num_prompt = int(row.num_prompt_tokens)
        cached = min(int(row.num_cached_tokens or 0), num_prompt - 1)
        prompt = shared[:cached] + [rng.randrange(1, 30_000) for _ in range(num_prompt - cached)]
        outputs = row.num_output_tokens
        max_tokens = int(outputs) if outputs == outputs and outputs > 0 else 1  # NaN != NaN
        arrival = sum(1 for start in starts if start < row.arrival)
        made.append(WorkloadRequest(f"r{i}", arrival, tuple(prompt), max_tokens))
    num_blocks = meta.get("num_blocks") or [64]
    limits = {
        k: int(meta[k]) for k in ("block_size", "max_num_batched_tokens", "max_num_seqs", "max_model_len") if k in meta
    }
    return Workload(
        tuple(made),
        int(num_blocks[worker_id]),
        description=f"shaped like a recorded run (worker {worker_id})",
        **limits,
    )
