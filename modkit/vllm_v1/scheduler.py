"""``VLLMScheduler``: modkit's scheduler surface, with ``vllm.v1.core.sched.scheduler.Scheduler`` deciding.

vLLM's scheduler owns the queues, the token budget, preemption and its own KV cache
manager (sized to ``num_blocks``); this class translates in both directions, so modkit's
engine and worker run its plans unchanged::

    modkit Request --add_request--> vllm Request (same req_id, vLLM SamplingParams)
    schedule():            vllm SchedulerOutput --> modkit SchedulerOutput (+ StepRecord)
    update_from_output():  modkit ModelRunnerOutput --> vllm ModelRunnerOutput
                           vllm EngineCoreOutputs   --> modkit EngineCoreOutputs

The modkit ``Request`` objects stay the ones callers hold: their ``num_computed_tokens``,
status and output tokens are copied from vLLM's after each call.

Translating the plan: vLLM tells its worker only block-table *diffs* and keeps sampled
tokens on the worker; a resumed (preempted) request comes back as a "cached" request
with ``resumed`` set. modkit's worker drops a preempted request and expects it back as a
new one with its whole block table and every token. So the diff is recomputed here from
the full block tables, exactly as modkit's scheduler does.

Decisions that differ from modkit's scheduler (``modkit.vllm_v1.compare`` measures them):

- **Admission needs the whole prompt to fit.** vLLM 0.32 admits a waiting request only
  if blocks for *all* its tokens are free (``scheduler_reserve_full_isl``), even when this
  step computes one chunk; modkit needs blocks for the chunk only.
- **Same-step prefix hits.** vLLM caches full blocks when it allocates them, so a request
  admitted after another in the same step already hits its prompt blocks; modkit's hits
  start after the forward.
- **Stops before min_tokens.** vLLM's ``check_stop`` finishes a request on eos or a stop
  token id whatever ``min_tokens`` says: it relies on the sampler having masked them.
  modkit's scheduler checks ``min_tokens`` itself. Same result whenever the mask ran.
- **Victim choice.** vLLM's FCFS preempts ``running[-1]``; modkit's the latest arrival.
  These agree while requests run in arrival order (they do under FCFS).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from modkit.kvcache.events import KVEventSink
from modkit.request import Request, RequestStatus
from modkit.scheduler.checks import admit_checks
from modkit.scheduler.output import (
    MAX_STEP_RECORDS,
    NO_FREE_BLOCKS,
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    ScheduledEntry,
    SchedulerOutput,
    StepRecord,
)
from modkit.vllm_v1.bridge import (
    EventPublisher,
    StructuredOutputManager,
    VllmModelRunnerOutput,
    VllmRequest,
    VllmRequestStatus,
    VllmScheduler,
    block_hasher,
    kv_cache_config,
    to_vllm_params,
    vllm_config,
)
from modkit.vllm_v1.kv_cache_manager import VLLMKVCacheManager

_FINISHED = {"stop": RequestStatus.FINISHED_STOPPED, "length": RequestStatus.FINISHED_LENGTH_CAPPED}


class VLLMScheduler:
    """modkit's ``Scheduler`` methods and attributes, answered by vLLM V1's scheduler."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        max_model_len: int = 2048,
        enable_prefix_caching: bool = True,
        policy: Literal["fcfs", "priority"] = "fcfs",
        model: str | Path | None = None,
        kv_event_sink: KVEventSink | None = None,
    ) -> None:
        if policy not in ("fcfs", "priority"):
            raise ValueError(f"vLLM's scheduler knows the policies 'fcfs' and 'priority', got {policy!r}")
        config = vllm_config(
            num_blocks,
            block_size,
            max_num_batched_tokens,
            max_num_seqs,
            max_model_len,
            enable_prefix_caching,
            policy,
            model,
        )
        self.vllm = VllmScheduler(
            vllm_config=config,
            kv_cache_config=kv_cache_config(num_blocks, block_size),
            structured_output_manager=StructuredOutputManager(config),
            block_size=block_size,
            hash_block_size=block_size,
        )
        # NOTE: vLLM's config refuses max_num_seqs > max_num_batched_tokens, a limit of its GPU
        # model runner, not of the scheduling algorithm; modkit allows it. The config was built
        # clamped; the scheduler gets the limit modkit's would have.
        self.vllm.max_num_running_reqs = self.vllm.max_num_active_reqs = max_num_seqs
        self.kv = VLLMKVCacheManager.viewing(self.vllm.kv_cache_manager, block_size, kv_event_sink)
        # vLLM's scheduler publishes its KV cache manager's events after each update_from_output;
        # its publisher (a no-op here) is replaced by one that hands them to the view.
        self.vllm.kv_event_publisher = _ToView(self.kv)
        self._hasher = block_hasher(block_size) if enable_prefix_caching else None
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.policy = policy
        self.requests: dict[str, Request] = {}  # the callers' requests, kept in step with vLLM's
        self.worker_num_tokens: dict[str, int] = {}  # tokens of each request the worker holds
        self._worker_blocks: dict[str, int] = {}  # length of each request's block table there
        self._pending: dict[int, Any] = {}  # step -> vLLM's SchedulerOutput, until update_from_output
        self.step_count = 0
        self.num_preemptions = 0
        self.records: deque[StepRecord] = deque(maxlen=MAX_STEP_RECORDS)  # the last steps' records
        self.last_record: StepRecord | None = None

    # -- requests in and out -------------------------------------------------------------

    @property
    def running(self) -> list[Request]:
        return [self.requests[r.request_id] for r in self.vllm.running]

    @property
    def waiting(self) -> list[Request]:
        """Waiting requests in vLLM's order (those still holding blocks first, as vLLM drains them)."""
        return [self.requests[r.request_id] for q in (self.vllm.kv_holding_waiting, self.vllm.waiting) for r in q]

    def add_request(self, request: Request) -> None:
        admit_checks(request, self.requests, self.max_model_len)
        params = to_vllm_params(request.sampling_params, request.eos_token_ids, max_tokens=request.max_tokens)
        mirror = VllmRequest(
            request.req_id,
            list(request.prompt_token_ids),
            params,
            None,
            arrival_time=request.arrival_time,
            priority=request.priority,
            block_hasher=self._hasher,
        )
        if request.output_token_ids:  # moved here from another worker with outputs so far
            mirror.append_output_token_ids(list(request.output_token_ids))
        request.status = RequestStatus.WAITING
        self.requests[request.req_id] = request
        self.vllm.add_request(mirror)

    def finish_requests(self, req_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finish requests from outside (a stop string, a client abort). Unknown ids are ignored."""
        assert status.is_finished
        ids = [req_ids] if isinstance(req_ids, str) else [r for r in req_ids if r in self.requests]
        self.vllm.finish_requests(ids, VllmRequestStatus[status.name])
        for req_id in ids:
            if req_id in self.requests:
                self._forget(self.requests[req_id], status)

    def take_requests(self, req_ids: Iterable[str]) -> list[Request]:
        """Hand requests over to another scheduler (their worker is gone), as modkit's ``Scheduler`` does:
        vLLM forgets them (freeing their blocks), and each leaves unfinished with its outputs so far."""
        ids = [r for r in req_ids if r in self.requests]
        self.vllm.finish_requests(ids, VllmRequestStatus.FINISHED_ABORTED)
        taken = []
        for req_id in ids:
            request = self.requests.pop(req_id)
            request.status, request.num_computed_tokens = RequestStatus.WAITING, 0
            self.worker_num_tokens.pop(req_id, None)
            self._worker_blocks.pop(req_id, None)
            taken.append(request)
        return taken

    def has_unfinished_requests(self) -> bool:
        return bool(self.vllm.get_num_unfinished_requests())

    # -- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = self.vllm.schedule()
        self._pending[self.step_count] = out
        preempted: dict[str, str] = {}
        for req_id in out.preempted_req_ids or ():
            request = self.requests[req_id]
            request.status, request.num_computed_tokens = RequestStatus.PREEMPTED, 0
            request.num_preemptions += 1
            self.num_preemptions += 1
            self.worker_num_tokens.pop(req_id, None)
            self._worker_blocks.pop(req_id, None)
            preempted[req_id] = "no free KV block (vLLM preempts the last running request)"

        admitted = {r.req_id for r in out.scheduled_new_reqs} | set(out.scheduled_cached_reqs.resumed_req_ids)
        new_reqs, cached_reqs, entries = [], [], []
        queries = hits = 0
        for req_id, n in out.num_scheduled_tokens.items():
            request, mirror = self.requests[req_id], self.vllm.requests[req_id]
            assert request.num_tokens == mirror.num_tokens, f"{req_id}: modkit and vLLM disagree on its tokens"
            before = mirror.num_computed_tokens - n  # vLLM has already advanced it
            request.status, request.num_computed_tokens = RequestStatus.RUNNING, mirror.num_computed_tokens
            blocks = self.kv.get_block_ids(req_id)
            if req_id in admitted:
                queries, hits = queries + request.num_tokens, hits + before
                if request.num_cached_tokens is None:
                    request.num_cached_tokens = before
                entries.append(ScheduledEntry(req_id, n, "prompt", before, before))
            else:
                kind = "decode" if before == request.num_tokens - 1 >= request.num_prompt_tokens else "prompt"
                entries.append(ScheduledEntry(req_id, n, kind, before))
            if req_id not in self.worker_num_tokens:
                tokens, num_prompt = list(request.all_token_ids), request.num_prompt_tokens
                new_reqs.append(NewRequestData(req_id, tokens, num_prompt, blocks, before, request.sampling_params))
            else:
                known, known_blocks = self.worker_num_tokens[req_id], self._worker_blocks[req_id]
                new_tokens, new_blocks = request.all_token_ids[known:], blocks[known_blocks:]
                cached_reqs.append(CachedRequestData(req_id, new_tokens, new_blocks, before))
            self.worker_num_tokens[req_id] = request.num_tokens
            self._worker_blocks[req_id] = len(blocks)
        self.kv.prefix_cache_queries += queries
        self.kv.prefix_cache_hits += hits

        plan = SchedulerOutput(
            step=self.step_count,
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=dict(out.num_scheduled_tokens),
            total_num_scheduled_tokens=out.total_num_scheduled_tokens,
            finished_req_ids=set(out.finished_req_ids),
            preempted_req_ids=set(preempted),
        )
        self.last_record = StepRecord(
            step=self.step_count,
            scheduled=entries,
            waiting=self._waiting_reasons(out, preempted),
            preempted=preempted,
            token_budget=self.max_num_batched_tokens,
            tokens_used=out.total_num_scheduled_tokens,
            num_running=len(self.vllm.running),
            kv_usage=self.kv.usage,
            num_waiting=sum(self.vllm.get_request_counts()[1:]),
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
        )
        self.records.append(self.last_record)
        self.step_count += 1
        return plan

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Hand the sampled tokens to vLLM; copy its verdicts (tokens appended, finishes) back."""
        out = self._pending.pop(scheduler_output.step)
        sampled = dict(zip(runner_output.req_ids, runner_output.sampled_token_ids, strict=True))
        logprobs = dict(zip(runner_output.req_ids, runner_output.logprobs, strict=False))
        ids = list(out.num_scheduled_tokens)
        result = self.vllm.update_from_output(
            out,
            VllmModelRunnerOutput(
                req_ids=ids,
                req_id_to_index={r: i for i, r in enumerate(ids)},
                sampled_token_ids=[[sampled[r]] if r in sampled else [] for r in ids],
            ),
        )
        outputs = []
        for batch in result.values():
            for vout in batch.outputs:
                request = self.requests.get(vout.request_id)
                if request is None:
                    continue
                for token in vout.new_token_ids:
                    request.append_output_token_ids(token)
                reason = None if vout.finish_reason is None else str(vout.finish_reason)
                if reason is not None:
                    request.stop_reason = vout.stop_reason
                    self._forget(request, _FINISHED.get(reason, RequestStatus.FINISHED_ABORTED))
                lp = logprobs.get(vout.request_id)
                outputs.append(
                    EngineCoreOutput(
                        vout.request_id,
                        list(vout.new_token_ids),
                        reason,
                        vout.stop_reason,
                        [lp] if lp is not None else None,
                    )
                )
        return outputs

    # -- bookkeeping -------------------------------------------------------------------

    def _forget(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.worker_num_tokens.pop(request.req_id, None)
        self._worker_blocks.pop(request.req_id, None)
        del self.requests[request.req_id]

    def _waiting_reasons(self, out: Any, preempted: dict[str, str]) -> dict[str, str]:
        """Why each unscheduled request waits. vLLM gives no reasons: these are inferred, in its order of checks."""
        reasons = {}
        for mirror in self.vllm.running:
            if mirror.request_id not in out.num_scheduled_tokens:
                reasons[mirror.request_id] = "token budget used up by earlier running requests"
        head = None
        for request in self.waiting:
            if preempted:
                reasons[request.req_id] = "preemption this step: no admissions"
            elif out.total_num_scheduled_tokens >= self.max_num_batched_tokens:
                reasons[request.req_id] = "token budget used up"
            elif len(self.vllm.running) >= self.max_num_seqs:
                reasons[request.req_id] = f"max_num_seqs={self.max_num_seqs} running"
            elif head is None:
                head = request.req_id
                reasons[head] = f"{NO_FREE_BLOCKS} (vLLM admits a request only if all its tokens fit)"
            else:
                reasons[request.req_id] = f"queued behind {head}"
        return reasons

    def check_invariants(self) -> None:
        """Raise AssertionError if vLLM's state, the modkit requests and the blocks disagree."""
        self.kv.check_invariants()
        running_ids = {r.request_id for r in self.vllm.running}
        waiting_ids = {r.req_id for r in self.waiting}
        assert not running_ids & waiting_ids, "a request is both running and waiting"
        assert running_ids | waiting_ids == set(self.requests) == set(self.vllm.requests), "queues and requests differ"
        assert self.kv.held_req_ids() <= running_ids, "only running requests hold blocks"
        assert len(running_ids) <= self.max_num_seqs
        for req_id, request in self.requests.items():
            mirror = self.vllm.requests[req_id]
            assert request.num_tokens == mirror.num_tokens, f"{req_id}: token counts differ"
            assert request.num_computed_tokens == mirror.num_computed_tokens, f"{req_id}: computed tokens differ"
            if req_id in running_ids:
                assert request.status == RequestStatus.RUNNING
                held = len(self.kv.get_block_ids(req_id)) * self.kv.block_size
                assert held >= request.num_computed_tokens, f"{req_id} computed tokens beyond its blocks"
            else:
                assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
                assert request.num_computed_tokens == 0


class _ToView(EventPublisher):
    """vLLM's event publisher interface: hands each batch of KV events to the KV view."""

    def __init__(self, view: VLLMKVCacheManager) -> None:
        super().__init__()
        self.view = view

    def publish(self, batch: Any) -> None:
        self.view.publish(batch.events)

    def shutdown(self) -> None:
        """Nothing to close."""
