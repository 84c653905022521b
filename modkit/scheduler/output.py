"""What the scheduler hands out each step, and what comes back.

``SchedulerOutput`` is a *diff*, as in vLLM V1: the worker keeps each running request's
tokens and block table between steps, so a step sends new requests in full and, for the
ones the worker already knows, only what changed (new blocks, newly sampled tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modkit.kvtransfer.metadata import KVConnectorMetadata
from modkit.logprobs import PromptLogprobs, TokenLogprobs
from modkit.sampling_params import SamplingParams

# A step names why the first requests in line wait; num_waiting counts them all. Naming every
# one of a long queue, every step, would cost the hot path time for a view nobody reads that far.
MAX_WAITING_REASONS = 16
# Why the first in line waits when admitting it asked the KV cache manager and found too few free
# blocks. The asking is a round trip in the pipeline, whether or not anything is admitted.
NO_FREE_BLOCKS = "not enough free KV blocks"
# A scheduler keeps the records of its last this many steps (``Scheduler.records``): a long-running
# engine would otherwise keep one per step for ever (each holds an entry per scheduled request).
MAX_STEP_RECORDS = 1000


@dataclass(slots=True)
class NewRequestData:
    """A request the worker has not seen (or forgot after a preemption): everything it needs."""

    req_id: str
    token_ids: list[int]  # prompt, plus the outputs so far when resuming after preemption
    num_prompt_tokens: int
    block_ids: list[int]  # its whole block table
    num_computed_tokens: int  # tokens already in the cache (a prefix-cache hit), skipped this step
    sampling_params: SamplingParams


@dataclass(slots=True)
class CachedRequestData:
    """A request the worker already holds: only what changed since it last ran."""

    req_id: str
    new_token_ids: list[int]  # tokens sampled since the worker last saw it (usually one)
    new_block_ids: list[int]  # blocks appended to its block table
    num_computed_tokens: int  # before this step


@dataclass(slots=True)
class SchedulerOutput:
    step: int
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # req_id -> tokens to compute this step, in batch order
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]  # finished or aborted since the last step: the worker drops them
    preempted_req_ids: set[str]  # lost their blocks this step: the worker drops them too
    # Disaggregation only (modkit.kvtransfer): blocks the worker saves for, or loads from, another worker.
    kv_connector_metadata: KVConnectorMetadata | None = None


@dataclass(slots=True)
class ModelRunnerOutput:
    """One step's sampled tokens, for the requests that reached the end of their known tokens."""

    req_ids: list[str]
    sampled_token_ids: list[int]
    # Per sampled request: the sampled token's logprob and the top alternatives, when asked for.
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    # Requests with prompt_logprobs whose prompt chunk ran this step (sampled or not): those logprobs.
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)


@dataclass(slots=True)
class EngineCoreOutput:
    """What happened to one request in one step."""

    req_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # 'stop', 'length', 'abort'
    stop_reason: int | str | None = None
    new_logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: PromptLogprobs | None = None  # a piece of the prompt's, when asked for (no new tokens, mid-prompt)


@dataclass(slots=True)
class ScheduledEntry:
    req_id: str
    num_tokens: int
    kind: str  # 'decode' (the one newest token) or 'prompt' (a prefill: prompt chunk, or recompute after preemption)
    num_computed_tokens: int  # before this step
    num_cached_tokens: int = 0  # prefix-cache hit skipped on admission


@dataclass(slots=True)
class StepRecord:
    """Why the batch of one step looks the way it does; drives the live views."""

    step: int
    scheduled: list[ScheduledEntry]
    waiting: dict[str, str]  # req_id -> why it was not scheduled: the first MAX_WAITING_REASONS in line
    preempted: dict[str, str]  # req_id -> why it lost its blocks
    token_budget: int
    tokens_used: int
    num_running: int
    kv_usage: float
    num_waiting: int = 0  # in the waiting queue after this step's admissions
    prefix_cache_queries: int = 0  # tokens of the requests admitted this step (vllm:prefix_cache_queries)
    prefix_cache_hits: int = 0  # of those, found in the prefix cache
