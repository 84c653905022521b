"""``LLM``: the offline API, as in vLLM. Give it prompts, get completions.

::

    from modkit import LLM, SamplingParams
    llm = LLM()                                   # the embedded tiny chat model
    out = llm.chat([{"role": "user", "content": "Hello!"}], SamplingParams(temperature=0))
    print(out[0].outputs[0].text)

Under the hood: each prompt becomes a ``Request`` (``n`` of them for ``n`` > 1), the engine
core steps until all are finished, and each new token is detokenized incrementally, which
is also where stop strings are found (as in vLLM, the output processor finishes a request
whose text reached a stop string).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from modkit.engine.config import EngineConfig
from modkit.engine.core import EngineCore
from modkit.engine.detokenizer import IncrementalDetokenizer
from modkit.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from modkit.kvcache import KVEventSink
from modkit.model import encode_chat, load_tokenizer
from modkit.request import Request, RequestStatus
from modkit.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


@dataclass(slots=True)
class _Tracked:
    """Output-side state of one sequence (one of the ``n`` of a prompt)."""

    request: Request
    detokenizer: IncrementalDetokenizer | None
    completion: CompletionOutput
    parent: RequestOutput


class LLM:
    """An in-process engine over a paged KV cache. Arguments are ``EngineConfig``'s fields."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str | None = None,
        device: str | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        enable_prefix_caching: bool = True,
        max_model_len: int | None = None,
        seed: int = 0,
        scheduling_policy: str = "fcfs",
        sampler: str = "default",
        attention_backend: str = "torch_batched",
        kv_event_sink: KVEventSink | None = None,
    ) -> None:
        self.config = EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            enable_prefix_caching=enable_prefix_caching,
            max_model_len=max_model_len,
            seed=seed,
            scheduling_policy=scheduling_policy,
            sampler=sampler,
            attention_backend=attention_backend,
        )
        self.engine = EngineCore(self.config, kv_event_sink)
        self.tokenizer = load_tokenizer(model)
        self._ids = itertools.count()
        self._tracked: dict[str, _Tracked] = {}  # req_id -> output-side state, while unfinished
        self.check_invariants_each_step = False  # tests turn this on

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    # -- public API ---------------------------------------------------------------------

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Complete each prompt: a string, a list of token ids, or ``{"prompt_token_ids": [...]}``."""
        prompt_list = _as_prompt_list(prompts)
        params = _per_prompt(sampling_params, len(prompt_list))
        added: list[str] = []
        try:
            outputs = [
                self._add(p, sp, priority[i] if priority else 0, added)
                for i, (p, sp) in enumerate(zip(prompt_list, params, strict=True))
            ]
            self._run(outputs, use_tqdm)
        except BaseException:
            # A bad prompt, an interrupt (Ctrl-C in a notebook): nothing of this call stays queued.
            self.engine.abort_requests([r for r in added if r in self._tracked])
            for req_id in added:
                self._tracked.pop(req_id, None)
            raise
        return outputs

    def chat(
        self,
        messages: list[dict[str, str]] | Sequence[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Reply to one conversation (a list of messages) or to several, in the model's chat template."""
        one = bool(messages) and isinstance(messages[0], dict)
        conversations = cast(list[list[dict[str, str]]], [messages] if one else list(messages))
        prompts: list[PromptType] = [{"prompt_token_ids": encode_chat(self.tokenizer, c)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def stats(self) -> dict[str, float]:
        kv = self.engine.kv_manager.stats()
        return {
            "num_preemptions": self.engine.scheduler.num_preemptions,
            "prefix_cache_queries": kv.prefix_cache_queries,
            "prefix_cache_hits": kv.prefix_cache_hits,
            "kv_blocks_total": kv.num_blocks_total,
            "kv_blocks_free": kv.num_blocks_free,
            "kv_blocks_cached": kv.num_blocks_cached,
            "kv_cache_usage": kv.usage,
            "num_evictions": kv.num_evictions,
            "num_steps": self.engine.scheduler.step_count,
        }

    # -- internals ----------------------------------------------------------------------

    def _add(self, prompt: PromptType, params: SamplingParams, priority: int, added: list[str]) -> RequestOutput:
        text, token_ids = self._tokenize(prompt)
        req_id = str(next(self._ids))
        output = RequestOutput(req_id, text, token_ids, [], metrics=RequestMetrics(time.time()))
        output.outputs = [CompletionOutput(i, "", []) for i in range(params.n)]
        tracked = []
        for i in range(params.n):
            child = params if params.n == 1 else params.child_params(i)
            request = Request(
                req_id if params.n == 1 else f"{req_id}-{i}",
                list(token_ids),
                child,
                arrival_time=output.metrics.arrival_time,
                priority=priority,
            )
            detok = None
            if child.detokenize:
                detok = IncrementalDetokenizer(
                    self.tokenizer,
                    token_ids,
                    skip_special_tokens=child.skip_special_tokens,
                    stop=child.stop,
                    include_stop_str_in_output=child.include_stop_str_in_output,
                )
            tracked.append(_Tracked(request, detok, output.outputs[i], output))
        for t in tracked:
            self.engine.add_request(t.request)
            self._tracked[t.request.req_id] = t
            added.append(t.request.req_id)
        return output

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, list(self.tokenizer.encode(prompt, add_special_tokens=False))
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self._tokenize(str(prompt["prompt"]))
            raise ValueError(f"a prompt dict needs 'prompt_token_ids' or 'prompt', got keys {sorted(prompt)}")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"a prompt is a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def _run(self, outputs: list[RequestOutput], use_tqdm: bool) -> None:
        total = sum(len(o.outputs) for o in outputs)
        bar = None
        if use_tqdm and total > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="Processed prompts", unit="req")
        try:
            while self.engine.has_unfinished_requests():
                now_outputs = self.engine.step()
                now = time.time()
                for out in now_outputs:
                    if self._process(out, now) and bar is not None:
                        bar.update(1)
                if self.check_invariants_each_step:
                    self.engine.check_invariants()
        finally:
            if bar is not None:
                bar.close()

    def _process(self, out: Any, now: float) -> bool:
        """Fold one engine output into its RequestOutput; True when that sequence finished."""
        t = self._tracked[out.req_id]
        completion, metrics = t.completion, t.parent.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        completion.token_ids.extend(out.new_token_ids)
        if out.new_logprobs is not None:
            completion.logprobs = completion.logprobs or []
            for lp, token in zip(out.new_logprobs, out.new_token_ids, strict=True):
                entry = {
                    tid: Logprob(v, rank=r + 1)
                    for r, (tid, v) in enumerate(zip(lp.top_token_ids, lp.top_logprobs, strict=True))
                }
                entry[token] = Logprob(lp.logprob, rank=lp.rank)
                completion.logprobs.append(entry)
                completion.cumulative_logprob = (completion.cumulative_logprob or 0.0) + lp.logprob
        finish_reason, stop_reason = out.finish_reason, out.stop_reason
        if t.detokenizer is not None:
            stop_string = t.detokenizer.update(out.new_token_ids, finished=finish_reason is not None)
            completion.text = t.detokenizer.output_text
            if stop_string is not None:
                if finish_reason is None:  # still running in the engine: end it there too
                    self.engine.abort_requests([out.req_id], RequestStatus.FINISHED_STOPPED)
                finish_reason, stop_reason = "stop", stop_string
        if finish_reason is None:
            return False
        completion.finish_reason, completion.stop_reason = finish_reason, stop_reason
        metrics.num_cached_tokens = max(metrics.num_cached_tokens, t.request.num_cached_tokens)
        metrics.num_preemptions += t.request.num_preemptions
        del self._tracked[out.req_id]
        if all(c.finish_reason is not None for c in t.parent.outputs):
            t.parent.finished = True
            metrics.finished_time = now
        return True


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return list(prompts)  # type: ignore[arg-type]


def _per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return list(params)
