"""The worker: keeps each scheduled request's tokens and block table, and runs each step.

It executes exactly what the scheduler decided: the block ids in its tables are the ones
the KV cache manager handed out, and the number of tokens each request computes is the
scheduler's ``num_scheduled_tokens``. It holds no policy of its own.

Under async scheduling a plan can ask for one token more than the worker was sent: the
token the worker itself sampled in the step before, which the scheduler had not seen when
it planned. ``record_sampled`` keeps each request's last sampled token for that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modkit.scheduler.output import SchedulerOutput
from modkit.worker.model_runner import ModelRunner, SequenceChunk


@dataclass(slots=True)
class CachedRequestState:
    """What the worker remembers of a request between steps."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    num_prompt_tokens: int


@dataclass(slots=True)
class StepResult:
    """Logits for the requests that reached the end of their known tokens this step."""

    req_ids: list[str]  # in the order of the logits rows
    logits: torch.Tensor  # (len(req_ids), vocab_size) float32, on the model's device
    num_tokens: int  # tokens computed in the forward


class Worker:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.requests: dict[str, CachedRequestState] = {}
        self.sampled: dict[str, int] = {}  # each request's last sampled token (record_sampled)
        self.failed_req_ids: set[str] = set()  # in a step that raised: skipped until the scheduler drops them

    def record_sampled(self, req_ids: list[str], token_ids: list[int]) -> None:
        """Keep the tokens just sampled: a plan made before they reached the scheduler computes them next."""
        self.sampled.update(zip(req_ids, token_ids, strict=True))

    def forget(self, scheduler_output: SchedulerOutput) -> None:
        """The step failed: its requests are being failed by the scheduler; a step planned after it skips them."""
        for req_id in scheduler_output.num_scheduled_tokens:
            self.requests.pop(req_id, None)
            self.sampled.pop(req_id, None)
            self.failed_req_ids.add(req_id)

    def execute_model(self, scheduler_output: SchedulerOutput) -> StepResult:
        self._apply_diff(scheduler_output)
        chunks, sample_ids = [], []
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
            chunks.append(SequenceChunk(state.token_ids[start : start + n], start, state.block_ids, int(samples)))
            if samples:
                sample_ids.append(req_id)
            state.num_computed_tokens += n
        if not chunks:
            vocab = self.runner.model.config.vocab_size
            return StepResult([], torch.empty((0, vocab), device=self.runner.device), 0)
        logits = self.runner.execute(chunks)
        return StepResult(sample_ids, logits, sum(len(c.token_ids) for c in chunks))

    def _apply_diff(self, out: SchedulerOutput) -> None:
        for req_id in out.finished_req_ids | out.preempted_req_ids:
            self.requests.pop(req_id, None)
            self.sampled.pop(req_id, None)
            self.failed_req_ids.discard(req_id)
        for new in out.scheduled_new_reqs:
            self.failed_req_ids.discard(new.req_id)  # readmitted after a preemption
            self.requests[new.req_id] = CachedRequestState(
                new.req_id, list(new.token_ids), list(new.block_ids), new.num_computed_tokens, new.num_prompt_tokens
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
                state.token_ids.append(sampled)
