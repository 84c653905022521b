"""The output side of the engine: engine outputs in, vLLM-shaped ``RequestOutput``s out.

For each step's ``EngineCoreOutput``s it extends each completion's tokens, text (through
an incremental detokenizer), logprobs and timings. Stop strings are found here, on the
text, as in vLLM's output processor: a match finishes the completion, and the caller must
also finish the request in the engine (``ProcessedStep.stopped``).

One prompt with ``n`` completions is one ``RequestOutput`` (``request_id``) and ``n``
engine requests (``request_id-0`` ... when n > 1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from modkit.engine.detokenizer import IncrementalDetokenizer
from modkit.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from modkit.logprobs import PromptLogprobs, TokenLogprobs
from modkit.request import Request
from modkit.sampling_params import SamplingParams
from modkit.scheduler import EngineCoreOutput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(slots=True)
class CompletionDelta:
    """What one step added to one completion (what a streaming response sends)."""

    request_id: str  # the RequestOutput's id
    index: int  # which of its n completions
    new_token_ids: list[int]
    text: str  # new text, safe to show: no split characters, nothing a stop string may cut
    finish_reason: str | None
    stop_reason: int | str | None
    new_logprobs: list[dict[int, Logprob]] | None
    # With prompt_logprobs, on a completion's first delta only: the prompt's (RequestOutput.prompt_logprobs).
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass(slots=True)
class ProcessedStep:
    deltas: list[CompletionDelta] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)  # engine req_ids a stop string finished
    finished: list[RequestOutput] = field(default_factory=list)  # every completion done


@dataclass(slots=True)
class _Tracked:
    request: Request
    detokenizer: IncrementalDetokenizer | None
    completion: CompletionOutput
    parent: RequestOutput
    # With prompt_logprobs: filled in prompt chunk by prompt chunk, handed on with the first token.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._tracked: dict[str, _Tracked] = {}  # engine req_id -> state, while unfinished

    def make_requests(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
    ) -> tuple[RequestOutput, list[Request]]:
        """The RequestOutput for a prompt and its n engine requests (not yet tracked)."""
        output = RequestOutput(request_id, prompt, prompt_token_ids, [], metrics=RequestMetrics(time.time()))
        output.outputs = [CompletionOutput(i, "", []) for i in range(params.n)]
        requests = []
        for i in range(params.n):
            child = params if params.n == 1 else params.child_params(i)
            req_id = request_id if params.n == 1 else f"{request_id}-{i}"
            requests.append(
                Request(
                    req_id, list(prompt_token_ids), child, arrival_time=output.metrics.arrival_time, priority=priority
                )
            )
        return output, requests

    def track(self, output: RequestOutput, index: int, request: Request) -> None:
        """Follow an engine request that was accepted by the engine."""
        params = request.sampling_params
        detok = None
        if params.detokenize:
            detok = IncrementalDetokenizer(
                self.tokenizer,
                output.prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
            )
        tracked = _Tracked(request, detok, output.outputs[index], output)
        if params.prompt_logprobs is not None:
            tracked.prompt_logprobs = [None] * len(output.prompt_token_ids)
        self._tracked[request.req_id] = tracked

    def forget(self, req_ids: list[str]) -> None:
        for req_id in req_ids:
            self._tracked.pop(req_id, None)

    def is_tracked(self, req_id: str) -> bool:
        return req_id in self._tracked

    def output_token_ids(self, req_id: str) -> list[int]:
        """The tokens a tracked engine request has generated so far."""
        return list(self._tracked[req_id].completion.token_ids)

    def process(self, outputs: list[EngineCoreOutput]) -> ProcessedStep:
        now = time.time()
        step = ProcessedStep()
        tracked = self._tracked
        for out in outputs:
            if (t := tracked.get(out.req_id)) is not None:
                if out.prompt_logprobs is not None:
                    _fill_prompt_logprobs(t, out.prompt_logprobs)
                    if not out.new_token_ids and out.finish_reason is None:
                        continue  # a prompt chunk's: nothing to show yet
                step.deltas.append(self._process_one(t, out, now, step))
        return step

    def _process_one(self, t: _Tracked, out: EngineCoreOutput, now: float, step: ProcessedStep) -> CompletionDelta:
        completion, metrics = t.completion, t.parent.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        completion.token_ids.extend(out.new_token_ids)
        new_logprobs = None
        if out.new_logprobs is not None:
            new_logprobs = []
            for lp, token in zip(out.new_logprobs, out.new_token_ids, strict=True):
                new_logprobs.append(_entry(lp, token))
                completion.cumulative_logprob = (completion.cumulative_logprob or 0.0) + lp.logprob
            completion.logprobs = (completion.logprobs or []) + new_logprobs
        finish_reason, stop_reason = out.finish_reason, out.stop_reason
        text = ""
        if t.detokenizer is not None:
            stop_string = t.detokenizer.update(out.new_token_ids, finished=finish_reason is not None)
            completion.text = t.detokenizer.output_text
            text = t.detokenizer.get_delta()
            if stop_string is not None:
                if finish_reason is None:  # still running in the engine: the caller ends it there
                    step.stopped.append(out.req_id)
                finish_reason, stop_reason = "stop", stop_string
        delta = CompletionDelta(
            t.parent.request_id,
            completion.index,
            list(out.new_token_ids),
            text,
            finish_reason,
            stop_reason,
            new_logprobs,
        )
        if t.prompt_logprobs is not None:  # handed on once, with the first token
            delta.prompt_logprobs, t.prompt_logprobs = t.prompt_logprobs, None
            if t.parent.prompt_logprobs is None:
                t.parent.prompt_logprobs = delta.prompt_logprobs
        if finish_reason is not None:
            completion.finish_reason, completion.stop_reason = finish_reason, stop_reason
            metrics.num_cached_tokens = max(metrics.num_cached_tokens, t.request.num_cached_tokens or 0)
            metrics.num_preemptions += t.request.num_preemptions
            del self._tracked[out.req_id]
            if all(c.finish_reason is not None for c in t.parent.outputs):
                t.parent.finished = True
                metrics.finished_time = now
                step.finished.append(t.parent)
        return delta


def _entry(lp: TokenLogprobs, token: int) -> dict[int, Logprob]:
    """{token_id: Logprob} of one position: the top alternatives, and the token itself."""
    entry = {
        tid: Logprob(v, rank=r + 1) for r, (tid, v) in enumerate(zip(lp.top_token_ids, lp.top_logprobs, strict=True))
    }
    entry[token] = Logprob(lp.logprob, rank=lp.rank)
    return entry


def _fill_prompt_logprobs(t: _Tracked, piece: PromptLogprobs) -> None:
    """Put a prompt chunk's logprobs in place. After the first token they were handed on: a chunk
    computed again (the request was preempted and recomputed) changes nothing."""
    if t.prompt_logprobs is None:
        return
    prompt = t.parent.prompt_token_ids
    for i, lp in enumerate(piece.logprobs):
        position = piece.start + i
        t.prompt_logprobs[position] = _entry(lp, prompt[position])
