"""The scheduler: each step, decide how many tokens of which requests the worker computes.

The invariant (vLLM V1's): there is no prefill phase and no decode phase. Each request has
``num_computed_tokens`` and ``num_tokens``; each step hands out a token budget
(``max_num_batched_tokens``) so that computed catches up with total. Chunked prefill falls
out of this: a prompt longer than what is left of the budget gets what is left, and the
rest next step.

One step (``schedule``, in three named phases):

1. ``_schedule_running``: running requests first, in order: each gets ``num_tokens - num_computed_tokens`` (one
   for a decoding request), capped by the budget. If the KV cache manager has no block for
   it, the policy's victim (under FCFS the latest arrival) is preempted: its blocks are
   freed, its ``num_computed_tokens`` drops to 0, and it waits to be recomputed.
2. ``_schedule_waiting``: then waiting requests, in the policy's order, while budget,
   ``max_num_seqs`` and free blocks last: for each, one prefix-cache lookup
   (``get_computed_blocks``) and one ``allocate_slots``, as in vLLM; its hit is skipped. No
   admissions in a step that preempted.
3. ``_advance``: every scheduled request's ``num_computed_tokens`` advances by what it was given, before
   the model runs; ``update_from_output`` then appends the sampled tokens and finishes
   requests on eos, a stop token id, ``max_tokens`` or the model's length limit.

Async scheduling (vLLM's ``async_scheduling``): ``schedule()`` may be called again before
the last step's tokens came back, so the next step is planned while the worker computes.
Each token still being sampled counts as one of the request's ``num_output_placeholders``:
a decoding request gets one more token to compute, which the worker fills in with the token
it sampled itself. A request whose in-flight token is its last (``max_tokens``, the model's
length) is not scheduled again; one that an in-flight token ends by eos computes one token
too many, which ``update_from_output`` drops, as vLLM does. Called in turn (schedule,
update, schedule...), nothing is ever a placeholder at planning time and this is the plain loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from functools import partial

from modkit.kvcache.interface import KVCacheManagerInterface
from modkit.kvtransfer.scheduler_side import SchedulerConnector
from modkit.request import Request, RequestStatus
from modkit.scheduler.checks import admit_checks, check_stop
from modkit.scheduler.output import (
    MAX_STEP_RECORDS,
    NO_FREE_BLOCKS,
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    StepRecord,
)
from modkit.scheduler.policies import SchedulingPolicy, get_policy
from modkit.scheduler.step import StepDraft


class Scheduler:
    def __init__(
        self,
        kv_cache_manager: KVCacheManagerInterface,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        max_model_len: int = 2048,
        policy: str | SchedulingPolicy = "fcfs",
    ) -> None:
        for name, value in (
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_num_seqs", max_num_seqs),
            ("max_model_len", max_model_len),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.kv = kv_cache_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.policy = get_policy(policy) if isinstance(policy, str) else policy
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # kept in the policy's admission order
        self.running: list[Request] = []
        self.finished_req_ids: set[str] = set()  # since the last schedule(), for the worker
        self.worker_num_tokens: dict[str, int] = {}  # tokens of each request the worker holds
        self._worker_blocks: dict[str, int] = {}  # length of each request's block table there
        self._tokens_in_flight: dict[str, int] = {}  # tokens scheduled in steps whose outputs are not back
        self.step_count = 0
        self.num_preemptions = 0
        self.records: deque[StepRecord] = deque(maxlen=MAX_STEP_RECORDS)  # the last steps' records
        self.last_record: StepRecord | None = None
        # Disaggregated prefill and decode (modkit.kvtransfer): tokens computed on another worker.
        self.connector: SchedulerConnector | None = None

    # -- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request (in the policy's order); it computes nothing before a step admits it.

        Raises ValueError, queueing nothing, for a request id in use or a prompt that leaves no
        room for one generated token; caps ``request.max_tokens`` at the model's length.
        """
        admit_checks(request, self.requests, self.max_model_len)
        request.status = RequestStatus.WAITING
        self.requests[request.req_id] = request
        self._enqueue(request)

    def finish_requests(self, req_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finish requests from outside (a stop string, a client abort). Unknown ids are ignored."""
        assert status.is_finished
        for req_id in [req_ids] if isinstance(req_ids, str) else req_ids:
            request = self.requests.get(req_id)
            if request is not None and not request.is_finished:
                self._finish(request, status)
        self.kv.flush()

    def take_requests(self, req_ids: Iterable[str]) -> list[Request]:
        """Hand requests over to another scheduler (their worker is gone). Unknown ids are ignored.

        Each leaves unfinished, as a preemption leaves: its blocks are freed and it keeps its
        outputs so far, so the scheduler that takes it recomputes and carries on.
        """
        taken = []
        for req_id in list(req_ids):
            request = self.requests.pop(req_id, None)
            if request is None:
                continue
            if request in self.running:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self.kv.free(request)
            request.status, request.num_computed_tokens = RequestStatus.WAITING, 0
            self._forget_worker_state(request)
            taken.append(request)
        self.kv.flush()
        return taken

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def can_plan_ahead(self) -> bool:
        """Whether a step planned before the last one's tokens are back computes anything for a running request."""
        return any(not self._last_token_in_flight(r) for r in self.running)

    def _last_token_in_flight(self, request: Request) -> bool:
        """The request's last token is being sampled now: another step would compute past its end."""
        ahead = request.num_output_placeholders
        return ahead > 0 and (
            request.num_output_tokens + ahead >= request.max_tokens or request.num_tokens + ahead >= self.max_model_len
        )

    def set_policy(self, policy: SchedulingPolicy) -> None:
        """Order requests by ``policy`` from the next step on (running requests keep running)."""
        self.policy = policy
        self.waiting.sort(key=policy.admission_key)

    # -- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plan one step: which requests compute how many tokens, within the token budget.

        Running requests first (``_schedule_running``), then waiting ones
        (``_schedule_waiting``); then every scheduled request's ``num_computed_tokens``
        advances by what it got, before the model runs. Returns the plan the worker runs
        exactly: each scheduled request's number of tokens, new requests in full and the others
        as a diff (``SchedulerOutput``). Why the batch looks the way it does goes to
        ``records`` (``StepRecord``).
        """
        if self.policy.reorders_over_time:
            self.waiting.sort(key=self.policy.admission_key)
        step = StepDraft(budget=self.max_num_batched_tokens)
        self._schedule_running(step)
        self._schedule_waiting(step)
        output = self._make_output(step.scheduled, step.admitted, step.preempted)
        self._advance(step.scheduled)
        if self.connector is not None:
            output.kv_connector_metadata = self.connector.build_connector_meta(
                self.requests, step.scheduled, self.kv.get_block_ids
            )
        self._record(step)
        return output

    def _schedule_running(self, step: StepDraft) -> None:
        """1. Running requests, in order: decodes and the rest of chunked prompts, each capped by
        what is left of the budget. One the KV cache has no block for preempts the policy's
        victims until it fits (or is the victim itself)."""
        for request in list(self.running):  # a copy: preemptions remove from self.running
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this step, as another request's victim
            if step.budget == 0:
                step.note_out_of_budget(request)
                continue
            if request.num_output_placeholders and self._last_token_in_flight(request):
                continue
            known = request.num_tokens + request.num_output_placeholders  # tokens, sampled or in flight
            num_new = min(known - request.num_computed_tokens, step.budget)
            assert num_new > 0, f"running request {request.req_id} has nothing to compute"
            if not self._allocate_or_preempt(request, num_new, step):
                continue
            # Decode: only the newest token is left (known, or in flight), and it is an output
            # token. Anything else is a prefill: a prompt chunk (its last one may be one token),
            # or prompt + outputs recomputed after a preemption.
            decode = request.num_computed_tokens == known - 1 >= request.num_prompt_tokens
            step.schedule(request, num_new, "decode" if decode else "prompt")

    def _allocate_or_preempt(self, request: Request, num_new: int, step: StepDraft) -> bool:
        """Blocks for ``num_new`` more tokens of a running request, preempting the policy's
        victims until they fit. False if the request itself had to go."""
        while self.kv.allocate_slots(request, num_new) is None:
            victim = self.policy.pick_victim(self.running)
            step.unschedule(victim)  # if it was scheduled earlier in this step, take that back
            self._preempt(victim)
            step.preempted[victim.req_id] = f"no free KV block for {request.req_id}"
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, step: StepDraft) -> None:
        """2. Waiting requests in the policy's order, each with its prefix-cache hit skipped,
        while the budget, ``max_num_seqs`` and free blocks last. None in a step that preempted,
        and none overtakes the first that does not fit."""
        if not self.waiting:
            return
        if step.preempted:
            step.note_waiting_queue(self.waiting, "preemption this step: no admissions")
            return
        candidates = self.waiting[: max(self.max_num_seqs - len(self.running), 0)]
        # A hint: a KV cache manager in another process does all of the lookups and allocations
        # below in one round trip, and answers these calls from its reply (not when one asks for
        # prompt logprobs: the reply would hold the prefix-cache hit it must not take).
        hint = self.connector is None or not self.connector.remote  # loads change what admission allocates
        if (
            hint
            and candidates
            and step.budget > 0
            and all(r.sampling_params.prompt_logprobs is None for r in candidates)
        ):
            self.kv.prepare_admissions(candidates, step.budget)
        why = None  # why the first one left in line waits
        for request in candidates:
            if step.budget == 0:
                break
            hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            if request.sampling_params.prompt_logprobs is not None:  # every prompt position needs its logits,
                hit_blocks, num_hit = [], 0  # so none is skipped as cached (vLLM does the same)
            # Tokens a prefill worker computed (disaggregation): loaded into new blocks, not computed.
            num_external = self.connector.get_num_new_matched_tokens(request, num_hit) if self.connector else 0
            num_new = min(request.num_tokens - num_hit - num_external, step.budget)
            if self.kv.allocate_slots(request, num_external + num_new, hit_blocks, num_hit) is None:
                why = NO_FREE_BLOCKS
                break
            if self.connector is not None:
                self.connector.update_state_after_alloc(
                    request, partial(self.kv.get_block_ids, request.req_id), num_hit, num_external
                )
            request.num_computed_tokens = num_hit + num_external
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_hit
            step.admit(request, num_new, num_hit)
        del self.waiting[: len(step.admitted)]  # the admitted are the first in line
        for request in step.admitted:
            request.status = RequestStatus.RUNNING
            self.running.append(request)
        if why is None:
            why = "token budget used up" if step.budget == 0 else f"max_num_seqs={self.max_num_seqs} running"
        step.note_waiting_queue(self.waiting, why)

    def _advance(self, scheduled: dict[str, int]) -> None:
        """3. Advance before the model runs: the scheduler already counts these tokens as computed.
        A request that reaches its end samples a token: a placeholder until the step comes back."""
        in_flight = self._tokens_in_flight
        for req_id, n in scheduled.items():
            request = self.requests[req_id]
            request.num_computed_tokens += n
            in_flight[req_id] = in_flight.get(req_id, 0) + n
            if request.num_computed_tokens == request.num_tokens + request.num_output_placeholders:
                request.num_output_placeholders += 1

    def _record(self, step: StepDraft) -> None:
        self.last_record = StepRecord(
            step=self.step_count,
            scheduled=step.entries,
            waiting=step.waiting_why,
            preempted=step.preempted,
            token_budget=self.max_num_batched_tokens,
            tokens_used=self.max_num_batched_tokens - step.budget,
            num_running=len(self.running),
            kv_usage=self.kv.usage,
            num_waiting=len(self.waiting),
            prefix_cache_queries=step.prefix_cache_queries,
            prefix_cache_hits=step.prefix_cache_hits,
        )
        self.records.append(self.last_record)
        self.step_count += 1

    def _make_output(
        self, scheduled: dict[str, int], admitted: list[Request], preempted: dict[str, str]
    ) -> SchedulerOutput:
        new_reqs, cached_reqs = [], []
        admitted_ids = {r.req_id for r in admitted}
        for req_id in scheduled:
            request = self.requests[req_id]
            if req_id in admitted_ids:
                block_ids = self.kv.get_block_ids(req_id)
                new_reqs.append(
                    NewRequestData(
                        req_id,
                        list(request.all_token_ids),
                        request.num_prompt_tokens,
                        block_ids,
                        request.num_computed_tokens,
                        request.sampling_params,
                    )
                )
                self._worker_blocks[req_id] = len(block_ids)
            else:  # the worker has its table: only the blocks it has not seen
                known, known_blocks = self.worker_num_tokens[req_id], self._worker_blocks[req_id]
                new_block_ids = self.kv.get_block_ids(req_id, known_blocks)
                cached_reqs.append(
                    CachedRequestData(req_id, request.all_token_ids[known:], new_block_ids, request.num_computed_tokens)
                )
                if new_block_ids:
                    self._worker_blocks[req_id] = known_blocks + len(new_block_ids)
            # The worker also holds the tokens it sampled in steps still in flight: it fills them in itself.
            self.worker_num_tokens[req_id] = request.num_tokens + request.num_output_placeholders
        output = SchedulerOutput(
            step=self.step_count,
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=scheduled,
            total_num_scheduled_tokens=sum(scheduled.values()),
            finished_req_ids=self.finished_req_ids,
            preempted_req_ids=set(preempted),
        )
        self.finished_req_ids = set()
        return output

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Take a step's results: cache the blocks it computed, append each sampled token, and
        finish the requests that are done (eos, a stop token id, ``max_tokens``, the model's
        length), freeing their blocks. Returns what happened to each request that sampled.

        Steps come back in the order they were planned. A request preempted after this step
        was planned (async scheduling) still gets the step's token: it was computed over the
        request's own blocks, before anyone else's step could reuse them.
        """
        in_flight = self._tokens_in_flight
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            later = in_flight.pop(req_id, n) - n  # planned in steps after this one
            if later > 0:
                in_flight[req_id] = later
            request = self.requests.get(req_id)
            if request is not None and request.status == RequestStatus.RUNNING:
                self.kv.cache_blocks(request, request.num_computed_tokens - later)
        outputs = []
        prompt_logprobs = runner_output.prompt_logprobs
        if prompt_logprobs:  # a prompt chunk that sampled nothing: its logprobs alone
            sampled = set(runner_output.req_ids)
            for req_id, piece in prompt_logprobs.items():
                if req_id not in sampled and req_id in self.requests:
                    outputs.append(EngineCoreOutput(req_id, [], prompt_logprobs=piece))
        logprobs = runner_output.logprobs or [None] * len(runner_output.req_ids)
        for req_id, token, lp in zip(runner_output.req_ids, runner_output.sampled_token_ids, logprobs, strict=True):
            request = self.requests.get(req_id)
            if request is None:
                continue  # aborted while its step ran, or ended by a token of an earlier step (finished: gone)
            if request.num_output_placeholders > 0:
                request.num_output_placeholders -= 1
            request.append_output_token_ids(token)
            status = check_stop(request, token, self.max_model_len)
            finish_reason = None
            if status is not None:
                self._finish(request, status)
                finish_reason = status.finish_reason
            outputs.append(
                EngineCoreOutput(
                    req_id,
                    [token],
                    finish_reason,
                    request.stop_reason,
                    [lp] if lp is not None else None,
                    prompt_logprobs.get(req_id),
                )
            )
        return outputs

    # -- bookkeeping -------------------------------------------------------------------

    def _enqueue(self, request: Request) -> None:
        self.waiting.append(request)
        self.waiting.sort(key=self.policy.admission_key)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._forget_worker_state(request)
        self._enqueue(request)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
        request.status = status
        self._forget_worker_state(request)
        self.finished_req_ids.add(request.req_id)
        del self.requests[request.req_id]

    def _forget_worker_state(self, request: Request) -> None:
        """The worker drops the request (finished, preempted, moved): its tokens there and in flight stop counting."""
        self.worker_num_tokens.pop(request.req_id, None)
        self._worker_blocks.pop(request.req_id, None)
        self._tokens_in_flight.pop(request.req_id, None)
        request.num_output_placeholders = 0

    def check_invariants(self) -> None:
        """Raise AssertionError if requests, queues and blocks disagree."""
        self.kv.check_invariants()
        running_ids = {r.req_id for r in self.running}
        waiting_ids = {r.req_id for r in self.waiting}
        assert not running_ids & waiting_ids, "a request is both running and waiting"
        assert running_ids | waiting_ids == set(self.requests), "every live request is queued exactly once"
        assert self.kv.held_req_ids() <= running_ids, "only running requests hold blocks"
        assert len(self.running) <= self.max_num_seqs
        for r in self.running:
            assert r.status == RequestStatus.RUNNING
            assert r.num_computed_tokens <= r.num_tokens + r.num_output_placeholders
            held = len(self.kv.get_block_ids(r.req_id)) * self.kv.block_size
            assert held >= r.num_computed_tokens, f"{r.req_id} computed tokens beyond its blocks"
        for r in self.waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert r.num_computed_tokens == 0 and r.num_output_placeholders == 0
