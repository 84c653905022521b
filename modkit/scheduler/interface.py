"""The contract between the engine (or the scheduler process) and a scheduler.

A scheduler decides, each step, how many tokens of which requests the worker computes::

    add_request(request)            the request waits
    schedule()          -> SchedulerOutput       {req_id: num_scheduled_tokens}, blocks allocated
    (the worker runs exactly that plan; the sampler samples)
    update_from_output(plan, ModelRunnerOutput) -> [EngineCoreOutput]   tokens appended, requests finished

``modkit.scheduler.Scheduler`` and ``modkit.vllm_v1.scheduler.VLLMScheduler`` (vLLM V1's
scheduler, translated) both satisfy ``SchedulerInterface``; ``EngineCore`` and
``SchedulerService`` cannot tell which one they hold.

The invariant (vLLM V1's): there is no prefill phase and no decode phase. Each request has
``num_computed_tokens`` (tokens whose keys and values are in its KV blocks) and
``num_tokens`` (prompt + outputs so far); each step lets the first catch up with the second.

An implementation may assume:

- steps come back to ``update_from_output`` in the order ``schedule`` made them, each once;
- a request is added once (its ``req_id`` unused), and its tokens change only through
  ``update_from_output`` (which appends them).

It must guarantee, after every call (``check_invariants`` asserts it):

1. every live request is in exactly one of ``waiting`` and ``running``; ``requests`` holds
   exactly those, and finished requests are gone from all three;
2. a waiting (or preempted) request has ``num_computed_tokens == 0`` and holds no KV block;
   a running one has ``num_computed_tokens <= num_tokens + num_output_placeholders`` and
   blocks for at least that many tokens;
3. ``len(running) <= max_num_seqs``.

What ``schedule()`` promises the worker (``SchedulerOutput``):

- ``total_num_scheduled_tokens == sum(num_scheduled_tokens.values()) <= max_num_batched_tokens``,
  and every scheduled request gets at least one token;
- each scheduled request's block table (``get_block_ids`` of the KV cache manager) covers
  its ``num_computed_tokens`` before the step plus what it computes now: the worker writes
  keys and values there and nowhere else;
- a request the worker does not hold comes in ``scheduled_new_reqs`` with every token and
  its whole block table; one it holds comes in ``scheduled_cached_reqs`` with only what
  changed; ``finished_req_ids`` and ``preempted_req_ids`` name the requests it must drop;
- a request scheduled up to its last known token samples one token this step; the others
  (a prompt chunk that stops mid-prompt) sample nothing.

``schedule`` advances each scheduled request's ``num_computed_tokens`` before the model
runs, so a scheduler that plans the next step while the worker runs this one (async
scheduling, ``PlansAhead``) already counts these tokens as computed.

``update_from_output`` appends each sampled token to its request, finishes requests (eos, a
stop token id, ``max_tokens``, the model's length: it frees their blocks) and returns one
``EngineCoreOutput`` per sampled request that was still live. Finishing for other reasons
(a stop string, a client abort) comes from outside, through ``finish_requests``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from modkit.kvcache.interface import KVCacheManagerInterface
from modkit.request import Request, RequestStatus
from modkit.scheduler.output import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput, StepRecord


@runtime_checkable
class SchedulerInterface(Protocol):
    """A scheduler; see the module docstring for the contract.

    The attributes are read-only here: an implementation may keep them as attributes or
    compute them (``VLLMScheduler`` reads ``running`` and ``waiting`` from vLLM's queues).
    """

    @property
    def kv(self) -> KVCacheManagerInterface:
        """The KV cache manager whose blocks the plans name (vLLM's scheduler brings its own)."""
        ...

    @property
    def max_num_batched_tokens(self) -> int:
        """The token budget of one step."""
        ...

    @property
    def max_num_seqs(self) -> int:
        """At most this many requests run at once."""
        ...

    @property
    def max_model_len(self) -> int:
        """Prompt + outputs of a request never exceed this many tokens."""
        ...

    @property
    def requests(self) -> dict[str, Request]:
        """Every live (unfinished) request, by ``req_id``."""
        ...

    @property
    def running(self) -> list[Request]:
        """Requests that hold KV blocks, in the order they are scheduled."""
        ...

    @property
    def waiting(self) -> list[Request]:
        """Requests waiting to be admitted (new or preempted), in admission order."""
        ...

    @property
    def step_count(self) -> int:
        """Steps scheduled so far: the ``step`` the next ``SchedulerOutput`` carries."""
        ...

    @property
    def num_preemptions(self) -> int:
        """Preemptions so far."""
        ...

    @property
    def last_record(self) -> StepRecord | None:
        """Why the last step's batch looks as it does (None before the first step)."""
        ...

    @property
    def records(self) -> Sequence[StepRecord]:
        """The records of the last steps, oldest first: at most ``MAX_STEP_RECORDS`` of them."""
        ...

    def add_request(self, request: Request) -> None:
        """Queue a new request. ValueError if its id is in use or its prompt leaves no room for a token."""
        ...

    def finish_requests(self, req_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finish requests from outside (a stop string, an abort) with a finished ``status``,
        freeing their blocks; unknown ids are ignored."""
        ...

    def take_requests(self, req_ids: Iterable[str]) -> list[Request]:
        """Hand requests over to another scheduler (their worker is gone): each leaves
        unfinished, without blocks, with its outputs so far. Unknown ids are ignored."""
        ...

    def has_unfinished_requests(self) -> bool:
        """Whether any request is waiting or running."""
        ...

    def schedule(self) -> SchedulerOutput:
        """Plan one step: {req_id: num_scheduled_tokens}, with blocks allocated for them."""
        ...

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Take a step's sampled tokens back: append them, finish the requests that are done."""
        ...

    def check_invariants(self) -> None:
        """Raise AssertionError if requests, queues and blocks disagree (see the module docstring)."""
        ...


@runtime_checkable
class PlansAhead(Protocol):
    """A scheduler that may plan step S+1 before step S's tokens are back (async scheduling).

    It counts each token still being sampled as a placeholder, so the plan asks the worker
    to compute a token only the worker has seen yet. modkit's scheduler does; vLLM's, as
    modkit wraps it, is stepped in turn.
    """

    def can_plan_ahead(self) -> bool:
        """Whether a step planned now, before the last one's tokens are back, computes
        anything for a running request."""
        ...
