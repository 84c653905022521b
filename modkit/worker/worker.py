"""The worker: keeps each scheduled request's tokens and block table, and runs each step.

It executes exactly what the scheduler decided: the block ids in its tables are the ones
the KV cache manager handed out, and the number of tokens each request computes is the
scheduler's ``num_scheduled_tokens``. It holds no policy of its own.

Under async scheduling a plan can ask for one token more than the worker was sent: the
token the worker itself sampled in the step before, which the scheduler had not seen when
it planned. The worker keeps each request's last sampled token for that::

    launch step S     record_sampled_on_device(S, ...)   the token, still on the device
    launch step S+1   the token's input row is read from step S's sampled ids, on the device
    finish step S     record_sampled(S, ...)             the token, on the host

So step S+1 can be launched before step S's tokens reach the host (vLLM's async scheduling
does the same): the GPU runs S+1 right after S, and the host copy of S's tokens waits
behind nothing. Launched after ``record_sampled``, the step takes the token from the host.

A request with ``prompt_logprobs`` gets logits for every position of its prompt chunks,
not only the last: the logprob of each prompt token given those before it, and the
request's ``prompt_logprobs`` most likely tokens, are computed here, after the forward
(``StepResult.prompt_logprobs``); the sampler sees only the rows it samples from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modkit.logprobs import PromptLogprobs, TokenLogprobs
from modkit.scheduler.output import SchedulerOutput
from modkit.worker.model_runner import DeviceTokens, ModelRunner, SequenceChunk

# In a request's token_ids: a token sampled on the device, not yet on the host. An int, not None:
# token_ids are copied into int64 tensors as they are, and no real token id is negative.
PLACEHOLDER = -1


@dataclass(slots=True)
class CachedRequestState:
    """What the worker remembers of a request between steps."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    num_prompt_tokens: int
    num_prompt_logprobs: int | None = None  # top tokens per prompt position; None: no prompt logprobs


@dataclass(slots=True)
class LastSampled:
    """A request's last sampled token: on the host once its step is finished, else a row on the device."""

    step: int
    token_id: int | None  # None until record_sampled
    device_ids: torch.Tensor  # the step's sampled ids, (N,) int64 on the device
    row: int


@dataclass(slots=True)
class StepResult:
    """Logits for the requests that reached the end of their known tokens this step."""

    req_ids: list[str]  # in the order of the logits rows
    logits: torch.Tensor  # (len(req_ids), vocab_size) float32, on the model's device
    num_tokens: int  # tokens computed in the forward
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)  # on the host


class Worker:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.requests: dict[str, CachedRequestState] = {}
        self.sampled: dict[str, LastSampled] = {}  # each request's last sampled token, until a step computes it
        # Tokens a launched step reads on the device: req_id -> (step that sampled it, index in token_ids).
        self.placeholders: dict[str, tuple[int, int]] = {}
        self.failed_req_ids: set[str] = set()  # in a step that raised: skipped until the scheduler drops them

    def record_sampled_on_device(self, step: int, req_ids: list[str], device_ids: torch.Tensor) -> None:
        """Step ``step`` was launched and samples ``req_ids`` into ``device_ids`` (not yet on the host)."""
        for row, req_id in enumerate(req_ids):
            self.sampled[req_id] = LastSampled(step, None, device_ids, row)

    def record_sampled(self, step: int, req_ids: list[str], token_ids: list[int]) -> None:
        """Step ``step``'s tokens reached the host: a plan made before the scheduler saw them computes them next."""
        for req_id, token_id in zip(req_ids, token_ids, strict=True):
            placeholder = self.placeholders.get(req_id)
            if placeholder is not None and placeholder[0] == step:  # a later step already read it on the device
                del self.placeholders[req_id]
                self.requests[req_id].token_ids[placeholder[1]] = token_id
            elif (sampled := self.sampled.get(req_id)) is not None and sampled.step == step:
                sampled.token_id = token_id

    def forget(self, scheduler_output: SchedulerOutput) -> None:
        """The step failed: its requests are being failed by the scheduler; a step planned after it skips them."""
        for req_id in scheduler_output.num_scheduled_tokens:
            self._drop(req_id)
            self.failed_req_ids.add(req_id)

    def drop_all(self) -> None:
        """Forget every request (a restarted scheduler sends the ones it has again, as new)."""
        self.requests.clear()
        self.sampled.clear()
        self.placeholders.clear()
        self.failed_req_ids.clear()

    def _drop(self, req_id: str) -> None:
        self.requests.pop(req_id, None)
        self.sampled.pop(req_id, None)
        self.placeholders.pop(req_id, None)

    def execute_model(self, scheduler_output: SchedulerOutput) -> StepResult:
        on_device = self._apply_diff(scheduler_output)
        chunks, sample_ids = [], []
        fill = DeviceTokens()
        position = 0  # of the chunk's first token in the flat batch
        prompt_rows: list[tuple[str, int, int, int]] = []  # (req_id, first logits row, its position, rows)
        sample_rows: list[int] = []  # the logits rows the sampler reads
        num_rows = 0
        # Decodes first: attention backends batch the one-token requests apart from prompt chunks.
        order = sorted(scheduler_output.num_scheduled_tokens.items(), key=lambda item: item[1] > 1)
        for req_id, n in order:
            if req_id in self.failed_req_ids:
                continue
            state = self.requests[req_id]
            start = state.num_computed_tokens
            assert start + n <= len(state.token_ids), f"{req_id}: scheduled past its known tokens"
            # Only a request whose every known token is now computed samples a next token;
            # a prompt chunk that stops mid-prompt gets no logits.
            samples = start + n == len(state.token_ids)
            # Prompt logprobs: every position of a chunk that scores a prompt token (position p's
            # logits score token p + 1), and the last one if it samples.
            scores = state.num_prompt_logprobs is not None and start < state.num_prompt_tokens - 1
            num_logits = n if scores else int(samples)
            chunks.append(SequenceChunk(state.token_ids[start : start + n], start, state.block_ids, num_logits))
            if (sampled := on_device.get(req_id)) is not None:  # its newest token: read on the device
                fill.add(position + n - 1, sampled.device_ids, sampled.row)
            if scores:
                prompt_rows.append((req_id, num_rows, start, n))
            if samples:
                sample_ids.append(req_id)
                sample_rows.append(num_rows + num_logits - 1)
            num_rows += num_logits
            state.num_computed_tokens += n
            position += n
        if not chunks:
            vocab = self.runner.model.config.vocab_size
            return StepResult([], torch.empty((0, vocab), device=self.runner.device), 0)
        logits = self.runner.execute(chunks, fill if fill.positions else None)
        if not prompt_rows:
            return StepResult(sample_ids, logits, position)
        prompt_logprobs = {r[0]: self._prompt_logprobs(logits, *r) for r in prompt_rows}
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=logits.device)
        return StepResult(sample_ids, logits.index_select(0, rows), position, prompt_logprobs)

    def _prompt_logprobs(self, logits: torch.Tensor, req_id: str, row: int, start: int, n: int) -> PromptLogprobs:
        """The logprobs of the prompt tokens that positions ``start`` ... ``start + n - 1`` score, from
        their logits: rows ``row`` ... of ``logits``."""
        state = self.requests[req_id]
        assert state.num_prompt_logprobs is not None
        end = min(start + n, state.num_prompt_tokens - 1)  # the last prompt position scores no prompt token
        targets = torch.tensor(state.token_ids[start + 1 : end + 1], device=logits.device)  # (M,)
        logprobs = logits[row : row + len(targets)].float().log_softmax(dim=-1)  # (M, V)
        chosen = logprobs.gather(1, targets.unsqueeze(1))  # (M, 1)
        ranks = (logprobs >= chosen).sum(dim=-1)  # (M,): tokens tied with it count as ranked above, as sampled ones
        top_logprobs, top_ids = logprobs.topk(state.num_prompt_logprobs, dim=-1)  # (M, K) each
        entries = [
            TokenLogprobs(lp, rank, ids, tops)
            for lp, rank, ids, tops in zip(
                chosen.squeeze(1).tolist(), ranks.tolist(), top_ids.tolist(), top_logprobs.tolist(), strict=True
            )
        ]
        return PromptLogprobs(start + 1, entries)

    def _apply_diff(self, out: SchedulerOutput) -> dict[str, LastSampled]:
        """Bring the request table up to the plan; return the tokens this step reads on the device."""
        for req_id in out.finished_req_ids | out.preempted_req_ids:
            self._drop(req_id)
            self.failed_req_ids.discard(req_id)
        on_device: dict[str, LastSampled] = {}
        for new in out.scheduled_new_reqs:
            self.failed_req_ids.discard(new.req_id)  # readmitted after a preemption
            self.requests[new.req_id] = CachedRequestState(
                new.req_id,
                list(new.token_ids),
                list(new.block_ids),
                new.num_computed_tokens,
                new.num_prompt_tokens,
                new.sampling_params.prompt_logprobs,
            )
        for cached in out.scheduled_cached_reqs:
            if cached.req_id in self.failed_req_ids:
                continue
            state = self.requests[cached.req_id]
            state.token_ids.extend(cached.new_token_ids)
            state.block_ids.extend(cached.new_block_ids)
            assert state.num_computed_tokens == cached.num_computed_tokens, f"{cached.req_id}: out of step"
            sampled = self.sampled.pop(cached.req_id, None)
            if len(state.token_ids) < state.num_computed_tokens + out.num_scheduled_tokens[cached.req_id]:
                # Planned before the scheduler saw the token this worker sampled last step.
                assert sampled is not None, f"{cached.req_id}: scheduled past the tokens this worker knows"
                if sampled.token_id is not None:
                    state.token_ids.append(sampled.token_id)
                else:  # its step is still on the device
                    self.placeholders[cached.req_id] = (sampled.step, len(state.token_ids))
                    state.token_ids.append(PLACEHOLDER)
                    on_device[cached.req_id] = sampled
        return on_device
