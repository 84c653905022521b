"""``Workload``: the requests a simulation replays, each with its arrival time and output length.

Two ways to get one::

    workload = workload_from_trace(pipeline.trace())     # what a live run served, as it came
    workload = Workload.poisson(200, rate=8.0, prompt_len=64, output_len=32, seed=0, shared_prefix=32)
    workload = Workload.poisson(200, rate=8.0, prompt_len=range(16, 513), output_len=32)   # prompts of many lengths

A replayed request produces exactly its recorded number of tokens (as with ``ignore_eos``):
which tokens the model would pick is not simulated, only how long the engine takes to pick
them. ``Workload.poisson`` draws arrivals with ``modkit.loadgen.poisson_send_times``, so a
live run of the same workload through ``loadgen.open_loop`` (same ``rate`` and ``seed``)
sends its requests at the same offsets.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from modkit.loadgen import poisson_send_times
from modkit.sampling_params import SamplingParams
from modkit.trace.events import RequestArrived
from modkit.trace.trace import Trace


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    arrival_s: float  # seconds after the workload's first arrival
    prompt_token_ids: list[int]
    output_len: int  # tokens it produces before it finishes
    sampling_params: SamplingParams

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a request needs at least one prompt token")
        if self.output_len < 1:
            raise ValueError(f"output_len must be >= 1, got {self.output_len}")


@dataclass(frozen=True, slots=True)
class Workload:
    requests: list[WorkloadRequest]  # in arrival order
    # PipelineConfig fields of the run it was recorded on (empty for made-up traffic):
    # simulate() starts from these, then applies its overrides.
    config: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    def __repr__(self) -> str:
        span = self.requests[-1].arrival_s if self.requests else 0.0
        return f"Workload({len(self)} requests over {span:.2f} s)"

    @property
    def prompts(self) -> list[list[int]]:
        """Every prompt, in arrival order (what ``loadgen.open_loop`` sends to run it live)."""
        return [r.prompt_token_ids for r in self.requests]

    @classmethod
    def poisson(
        cls,
        num_requests: int,
        rate: float,
        prompt_len: int | Sequence[int],
        output_len: int,
        seed: int = 0,
        shared_prefix: int = 0,
        vocab_size: int = 1000,
    ) -> Workload:
        """``num_requests`` Poisson arrivals at ``rate`` per second, each a prompt of random token
        ids (below ``vocab_size``) whose first ``shared_prefix`` are the same for all, producing
        ``output_len`` tokens, greedy (loadgen's requests).

        ``prompt_len`` is every prompt's length, or lengths to draw each prompt's from, each
        as likely: a list (``[32, 64, 512]``) or a range (``range(16, 257)``).
        """
        lengths = [prompt_len] if isinstance(prompt_len, int) else list(prompt_len)
        if not lengths or min(lengths) < 1:
            raise ValueError(f"prompt_len must be >= 1, or a non-empty list of them, got {prompt_len!r}")
        if not 0 <= shared_prefix <= min(lengths):
            raise ValueError(
                f"shared_prefix must be in [0, the shortest prompt_len={min(lengths)}], got {shared_prefix}"
            )
        rng = random.Random(seed)
        prefix = [rng.randrange(1, vocab_size) for _ in range(shared_prefix)]
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        requests = []
        for at in poisson_send_times(num_requests, rate, seed):
            length = lengths[0] if len(lengths) == 1 else rng.choice(lengths)
            own = [rng.randrange(1, vocab_size) for _ in range(length - shared_prefix)]
            requests.append(WorkloadRequest(at, prefix + own, output_len, params))
        return cls(requests)


def workload_from_trace(trace: Trace) -> Workload:
    """The requests a recorded run served: arrivals relative to the first, prompts, the number of
    tokens each produced, and sampling parameters. Requests that produced no token (rejected,
    aborted before their first) are left out.

    ValueError for a trace recorded before ``RequestArrived`` carried prompts.
    """
    arrivals = [e for e in trace.events if isinstance(e, RequestArrived)]
    outputs = trace.requests.set_index("req_id")["num_output_tokens"] if len(trace.requests) else {}
    requests = []
    first = min((e.ts for e in arrivals), default=0.0)
    for e in sorted(arrivals, key=lambda e: e.ts):
        if e.prompt_token_ids is None:
            raise ValueError(f"request {e.req_id} was recorded without its prompt: record the run again")
        num_output = outputs.get(e.req_id)
        if num_output is None or num_output != num_output or num_output < 1:  # NaN: no token
            continue
        params = e.sampling_params or SamplingParams(max_tokens=e.max_tokens)
        params = dataclasses.replace(params, max_tokens=int(num_output), ignore_eos=True)
        requests.append(WorkloadRequest(e.ts - first, list(e.prompt_token_ids), int(num_output), params))
    return Workload(requests, recorded_config(trace.meta))


# Trace meta keys that are PipelineConfig fields of the same name.
_CONFIG_KEYS = (
    "num_workers",
    "prefill_workers",  # a run with roles: the simulator refuses it rather than treat its workers as aggregated
    "decode_workers",
    "block_size",
    "max_num_batched_tokens",
    "max_num_seqs",
    "max_model_len",
    "enable_prefix_caching",
    "scheduling_policy",
    "eviction_policy",
    "router_policy",
    "cpu_parallel_min_tokens",
)


def recorded_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The PipelineConfig fields a trace's ``meta`` records (a launch writes them), ``num_kv_blocks``
    the first worker's pool."""
    config = {k: meta[k] for k in _CONFIG_KEYS if meta.get(k) is not None}
    if meta.get("num_blocks"):
        config["num_kv_blocks"] = int(meta["num_blocks"][0])
    if meta.get("device") == "cpu" and "cpu_parallel_min_tokens" not in meta:
        config["cpu_parallel_min_tokens"] = 1  # recorded before small steps ran on one thread: every step on all
    return config
