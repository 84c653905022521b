"""One step on the device, for the in-process engine and the worker process alike.

::

    launch(plan)   Worker.execute_model(plan)       exactly the plan: its tokens, its block tables
                   sampler.sample(logits, states)   next to the logits; queued, not waited for
    finish(step)   the sampled ids to the host (the one copy) -> ModelRunnerOutput

``EngineCore`` (``LLM``) and ``WorkerService`` (the worker process) both drive a
``StepExecutor``: they differ only in where plans come from and where results go (a method
call, or a ZeroMQ message), and in when they finish a launched step.

The executor keeps each request's ``SamplingState`` (its sampling parameters, its outputs so
far for penalties and ``min_tokens``, its seeded generator, its grammar matcher for
structured outputs) in step with the plan's diff, as the worker keeps its request table:
created when the request is first scheduled, dropped when the plan says it finished. A
preempted request keeps its state: when it is resumed, its seeded generator goes on where
it stopped, so a seeded request samples the same tokens whether or not it was preempted,
in-process and in the pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from modkit.engine.config import EngineConfig
from modkit.model import load_model, load_tokenizer
from modkit.model.config import ModelConfig
from modkit.model.decoder import CausalLM
from modkit.sampler import GrammarBackend, Sampler, SamplerOutput, SamplingState
from modkit.scheduler.output import ModelRunnerOutput, SchedulerOutput
from modkit.worker.kv_cache import PagedKVCache
from modkit.worker.memory import MemoryPlan, plan_kv_cache
from modkit.worker.model_runner import ModelRunner
from modkit.worker.tensor_parallel import TensorParallelRanks
from modkit.worker.worker import PLACEHOLDER, StepResult, Worker


def piecewise_tokens(config: EngineConfig) -> int | None:
    """The token budget the piecewise graphs cover, or None under cudagraph_mode="full_decode_only"."""
    return config.max_num_batched_tokens if config.cudagraph_mode == "full_and_piecewise" else None


def use_cuda_graphs(model: CausalLM, config: EngineConfig) -> bool:
    """Decode steps replay CUDA graphs on a GPU, unless enforce_eager or the attention backend cannot.

    NOTE: a tensor-parallel worker runs eagerly: its ranks would have to capture and replay
    their all-reduces together, which modkit does not do.
    """
    backend = model.attention_backend
    eager = config.enforce_eager or model.tp.size > 1
    return model.lm_head.weight.is_cuda and not eager and backend.supports_cuda_graphs


def build_worker(
    model: CausalLM, config: EngineConfig, max_model_len: int, num_sharing: int = 1
) -> tuple[Worker, MemoryPlan]:
    """The model's paged KV cache, sized for ``1 / num_sharing`` of the device's budget (workers of
    one machine share it), and a ``Worker`` over it, its CUDA graphs captured where they apply.

    Every tensor-parallel rank runs this with the same arguments: each sizes its own cache, and
    all take the smallest number of blocks, so a block id means the same block on every rank.
    """
    cuda_graphs = use_cuda_graphs(model, config)
    memory = plan_kv_cache(model, config, max_model_len, num_sharing=num_sharing, cuda_graphs=cuda_graphs)
    dtype, device = model.lm_head.weight.dtype, model.lm_head.weight.device
    memory.num_blocks = model.tp.smallest(memory.num_blocks, device)
    kv_cache = PagedKVCache.allocate(model.config, memory.num_blocks, config.block_size, dtype, device, model.tp.size)
    worker = Worker(ModelRunner(model, kv_cache))
    if cuda_graphs:
        worker.runner.capture_cuda_graphs(config.max_num_seqs, max_model_len, piecewise_tokens(config))
        memory.cuda_graph_bytes = worker.runner.cuda_graph_pool_bytes
    return worker, memory


def start_worker(config: EngineConfig, max_model_len: int, num_sharing: int = 1) -> tuple[CausalLM, Worker, MemoryPlan]:
    """Load the model and build its ``Worker`` (``build_worker``).

    With ``tensor_parallel_size`` N > 1 this process becomes rank 0: ranks 1..N-1 start first
    and set up beside it, each its own slice; ``worker.runner.tensor_parallel_ranks`` is the
    handle that feeds them each step and stops them (``close()``), here too if anything fails.
    """
    if config.tensor_parallel_size == 1:
        model = load_model(
            config.model, dtype=config.dtype, device=config.device, attention_backend=config.attention_backend
        )
        return (model, *build_worker(model, config, max_model_len, num_sharing))
    ranks = TensorParallelRanks.start(config, max_model_len, num_sharing)
    try:
        model = load_model(
            config.model,
            dtype=config.dtype,
            device=ranks.device,
            attention_backend=config.attention_backend,
            tp=ranks.tp,
        )
        worker, memory = build_worker(model, config, max_model_len, num_sharing)
        ranks.attach(model, worker.runner.kv_cache)
    except BaseException:
        ranks.close()
        raise
    worker.runner.tensor_parallel_ranks = ranks
    return model, worker, memory


def grammar_backend(model: str | Path | None, config: ModelConfig) -> GrammarBackend:
    """Compiles structured outputs for the model's vocabulary; its tokenizer is loaded on the first grammar."""
    return GrammarBackend(lambda: load_tokenizer(model), config.vocab_size, config.eos_token_ids)


@dataclass(slots=True)
class LaunchedStep:
    """A step whose forward and sampling are queued on the device; its tokens are not on the host yet."""

    plan: SchedulerOutput
    started: float  # wall clock, for the forward event
    result: StepResult
    req_ids: list[str]  # the requests that sample, in the order of ``sampled``'s rows
    sampled: SamplerOutput | None  # still on the device
    forward_s: float  # host time to launch the forward
    sample_s: float  # host time to launch the sampling (finishing adds the wait for the tokens)
    done: torch.cuda.Event | None  # recorded after the sampling on a GPU; None on a CPU (done when launched)
    num_threads: int = 0  # torch's threads for the forward (a CPU worker runs small steps on one)

    def is_done(self) -> bool:
        """Whether the device has finished it (its tokens can be read without waiting)."""
        return self.done is None or bool(self.done.query())


class StepExecutor:
    """Runs the scheduler's plans on a ``Worker`` and samples next to the logits."""

    def __init__(
        self, worker: Worker, sampler: Sampler, eos_token_ids: Sequence[int], grammars: GrammarBackend | None = None
    ) -> None:
        self.worker = worker
        self.sampler = sampler
        self.eos_token_ids = tuple(eos_token_ids)
        self.grammars = grammars  # compiles structured outputs; None: requests with them fail
        self.device = worker.runner.device
        self.states: dict[str, SamplingState] = {}  # req_id -> its sampling state, from first scheduled to finished

    def launch(self, plan: SchedulerOutput) -> LaunchedStep:
        """Exactly the plan: its forward, then sampling next to the logits; queued, not waited for."""
        started = time.time()
        t0 = time.perf_counter()
        result = self.worker.execute_model(plan)
        t1 = time.perf_counter()
        self._track_states(plan)
        # A request the engine ended (a stop string, an abort) after this plan was made: not sampled.
        req_ids = [r for r in result.req_ids if r in self.states]
        logits = result.logits if len(req_ids) == len(result.req_ids) else result.logits[self._rows(result, req_ids)]
        sampled, done = None, None
        if req_ids:
            sampled = self.sampler.sample(logits, [self.states[r] for r in req_ids])
            sampled.start_copy_to_host()
            self.worker.record_sampled_on_device(plan.step, req_ids, sampled.sampled_token_ids)
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        sample_s, threads = time.perf_counter() - t1, torch.get_num_threads()
        return LaunchedStep(plan, started, result, req_ids, sampled, t1 - t0, sample_s, done, threads)

    def finish(self, step: LaunchedStep) -> ModelRunnerOutput:
        """Wait for the step's tokens (the one host copy). A plan made before the scheduler saw
        them computes them next (the worker fills them in)."""
        sampled = step.sampled.to_lists() if step.sampled is not None else []
        output = ModelRunnerOutput(step.req_ids, [s.token_id for s in sampled], [s.logprobs for s in sampled])
        output.prompt_logprobs = {r: lp for r, lp in step.result.prompt_logprobs.items() if r in self.states}
        self.worker.record_sampled(step.plan.step, step.req_ids, output.sampled_token_ids)
        return output

    def can_launch_ahead(self, plan: SchedulerOutput) -> bool:
        """Whether ``plan`` may be launched before the step in flight is finished: its sampling
        must not read the tokens that step brings (penalties, ``min_tokens``)."""
        states = [self.states[r] for r in plan.num_scheduled_tokens if r in self.states]
        return self.sampler.can_sample_ahead(states)

    def forget(self, req_ids: Iterable[str]) -> None:
        """Drop the sampling states of requests the engine ended between plans (the next plan says so too)."""
        for req_id in req_ids:
            self.states.pop(req_id, None)

    def fail(self, plan: SchedulerOutput) -> None:
        """The step raised: the scheduler fails its requests; a step planned after it skips them."""
        self.worker.forget(plan)
        self.forget(plan.num_scheduled_tokens)

    def _track_states(self, plan: SchedulerOutput) -> None:
        """Keep a ``SamplingState`` per request in step with the worker's request table (the plan's diff applied)."""
        self.forget(plan.finished_req_ids)
        for new in plan.scheduled_new_reqs:
            outputs = list(new.token_ids[new.num_prompt_tokens :])
            state = self.states.get(new.req_id)
            if state is None:  # first scheduled (a resumed request keeps its state, and its generator)
                prompt = new.token_ids[: new.num_prompt_tokens]
                params = new.sampling_params
                grammar = None
                if params.structured_outputs is not None:
                    assert self.grammars is not None, "structured outputs need a GrammarBackend"
                    grammar = self.grammars.grammar(params.structured_outputs)
                state = SamplingState.create(params, prompt, self.device, self.eos_token_ids, grammar)
                self.states[new.req_id] = state
            state.output_token_ids = outputs
        for cached in plan.scheduled_cached_reqs:
            held, state = self.worker.requests.get(cached.req_id), self.states.get(cached.req_id)
            if held is not None and state is not None:  # outputs sent in the plan, or filled in by the worker
                outputs = state.output_token_ids
                outputs.extend(held.token_ids[held.num_prompt_tokens + len(outputs) :])
                if outputs and outputs[-1] == PLACEHOLDER:  # still on the device: added next step
                    outputs.pop()

    @staticmethod
    def _rows(result: StepResult, req_ids: list[str]) -> list[int]:
        keep = set(req_ids)
        return [i for i, r in enumerate(result.req_ids) if r in keep]
