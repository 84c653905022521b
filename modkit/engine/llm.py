"""``LLM``: the offline API, as in vLLM. Give it prompts, get completions.

::

    from modkit import LLM, SamplingParams
    llm = LLM()                                   # the embedded tiny chat model
    out = llm.chat([{"role": "user", "content": "Hello!"}], SamplingParams(temperature=0))
    print(out[0].outputs[0].text)

Under the hood: each prompt becomes a ``Request`` (``n`` of them for ``n`` > 1), the engine
core steps until all are finished, and the ``OutputProcessor`` turns each step's tokens
into text, where stop strings are found (as in vLLM, a stop string found there finishes
the request in the engine too).
"""

from __future__ import annotations

import atexit
import itertools
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, cast

from modkit.engine.config import EngineConfig
from modkit.engine.core import EngineCore
from modkit.engine.output_processor import OutputProcessor, ProcessedStep
from modkit.engine.outputs import RequestOutput
from modkit.heap import frozen_heap
from modkit.kvcache import KVEventSink
from modkit.model import encode_chat, load_tokenizer
from modkit.request import RequestStatus
from modkit.sampling_params import SamplingParams
from modkit.scheduler import EngineCoreOutput
from modkit.worker.executor import LaunchedStep

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TextPrompt(TypedDict, total=False):
    """A prompt as text (vLLM's name); ``prompt_token_ids``, if given too, wins."""

    prompt: str
    prompt_token_ids: list[int]


# A string, token ids, or a dict: {"prompt": text} or {"prompt_token_ids": ids} (vLLM's prompt types).
PromptType = str | list[int] | TextPrompt


class LLM:
    """An in-process engine over a paged KV cache. Arguments are ``EngineConfig``'s fields.

    With ``tensor_parallel_size`` N > 1 this process is rank 0 and starts N - 1 more
    (``modkit.worker.tensor_parallel``); ``close()`` stops them. On the CPU the N ranks share
    the cores: each, this process included, runs with ``torch.get_num_threads() // N`` threads
    until ``close()``.
    """

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
        scheduler: str = "modkit",
        kv_cache_manager: str = "modkit",
        scheduling_policy: str = "fcfs",
        eviction_policy: str = "lru",
        sampler: str = "default",
        attention_backend: str = "auto",
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = False,
        cudagraph_mode: str = "full_and_piecewise",
        async_scheduling: bool = True,
        tensor_parallel_size: int = 1,
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
            scheduler=scheduler,
            kv_cache_manager=kv_cache_manager,
            scheduling_policy=scheduling_policy,
            eviction_policy=eviction_policy,
            sampler=sampler,
            attention_backend=attention_backend,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            cudagraph_mode=cudagraph_mode,
            async_scheduling=async_scheduling,
            tensor_parallel_size=tensor_parallel_size,
        )
        self.engine = EngineCore(self.config, kv_event_sink)
        # Ranks 1..N-1 of a tensor-parallel engine stop with close(), or when this LLM is collected.
        self._finalizer = weakref.finalize(self, self.engine.close)
        self.tokenizer = load_tokenizer(model)
        self._ids = itertools.count()
        self.processor = OutputProcessor(self.tokenizer)
        self.check_invariants_each_step = False  # tests turn this on
        self.overlap_steps = True  # detokenize step N while the device runs step N+1 (see steps())

    @property
    def max_model_len(self) -> int:
        """The longest request (prompt + output tokens): the model's limit, or what the KV cache holds."""
        return self.engine.max_model_len

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
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
            self.engine.abort_requests([r for r in added if self.processor.is_tracked(r)])
            self.processor.forget(added)
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
        return self.engine.stats()

    def close(self) -> None:
        """Stop the tensor-parallel ranks (``tensor_parallel_size`` > 1); the engine cannot step afterwards.
        Nothing to do for one rank, whose memory goes when the LLM is collected."""
        self._finalizer()

    # -- internals ----------------------------------------------------------------------

    def _add(self, prompt: PromptType, params: SamplingParams, priority: int, added: list[str]) -> RequestOutput:
        text, token_ids = self._tokenize(prompt)
        output, requests = self.processor.make_requests(str(next(self._ids)), text, token_ids, params, priority)
        for index, request in enumerate(requests):
            self.engine.add_request(request)
            self.processor.track(output, index, request)
            added.append(request.req_id)
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
            for step in self.steps():
                if bar is not None:
                    bar.update(sum(d.finish_reason is not None for d in step.deltas))
        finally:
            if bar is not None:
                bar.close()

    def steps(self) -> Iterator[ProcessedStep]:
        """Step the engine until no request is left; yield each step's processed outputs.

        Overlapped, as vLLM's engine is: while the device computes step N, the host plans
        step N+1 (async scheduling, ``EngineConfig.async_scheduling``) and, on a GPU,
        launches it too, so the device runs it right after step N (its decode tokens are
        read from step N's sampled ids on the device); then it detokenizes step N-1's tokens
        (checking them for stop strings). A request a stop string ends is aborted a step or
        two late, and the tokens it computed meanwhile are dropped (vLLM's async scheduling
        does the same).
        """
        loop = self._frozen_steps()
        _open_loops.add(loop)
        return loop

    def _frozen_steps(self) -> Iterator[ProcessedStep]:
        with frozen_heap():  # full collections skip the model, tokenizer and cache (modkit.heap)
            yield from self._steps()

    def _steps(self) -> Iterator[ProcessedStep]:
        if not self.overlap_steps:
            while self.engine.has_unfinished_requests():
                yield self._after(self.processor.process(self.engine.step()))
            return
        engine = self.engine
        in_flight: deque[LaunchedStep] = deque()  # launched, tokens not yet on the host: at most two
        if engine.has_unfinished_requests():
            in_flight.append(engine.launch_step())
        previous: list[EngineCoreOutput] | None = None
        try:
            while in_flight:
                ahead = engine.plan_ahead()  # step N+1, while the device runs step N
                if ahead is not None and engine.can_launch_ahead(ahead):
                    in_flight.append(engine.launch_step(ahead))  # queued behind step N
                    engine.num_launched_ahead += 1
                    ahead = None
                outputs, previous = previous, None
                step = self.processor.process(outputs) if outputs is not None else None  # step N-1
                previous = engine.finish_step(in_flight.popleft())
                if not in_flight and (ahead is not None or engine.has_unfinished_requests()):
                    in_flight.append(engine.launch_step(ahead))
                if step is not None:
                    yield self._after(step)
            if previous is not None:
                outputs, previous = previous, None
                yield self._after(self.processor.process(outputs))
        finally:
            # The caller stopped early: the steps in flight and the tokens held back are still processed.
            while in_flight:
                previous = (previous or []) + engine.finish_step(in_flight.popleft())
            if previous is not None:
                self._after(self.processor.process(previous))

    def _after(self, step: ProcessedStep) -> ProcessedStep:
        if step.stopped:  # finished by a stop string: end them in the engine too
            self.engine.abort_requests(step.stopped, RequestStatus.FINISHED_STOPPED)
        if self.check_invariants_each_step:
            self.engine.check_invariants()
        return step


# Step loops not run to their end (a cell interrupted, a loop left half-read in a script).
_open_loops: weakref.WeakSet[Iterator[ProcessedStep]] = weakref.WeakSet()


@atexit.register
def _close_open_loops() -> None:
    """Close each loop left open while the interpreter still works: closing finishes its steps in
    flight on the device. Left to interpreter teardown, that would run with modules half gone."""
    for loop in list(_open_loops):
        loop.close()  # type: ignore[attr-defined]


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
