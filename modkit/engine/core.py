"""The engine core: one step = schedule, run the model, sample, update.

::

    scheduler.schedule()          which requests compute how many tokens; blocks allocated
        -> worker.execute_model() the flat forward over exactly those blocks -> logits
        -> sampler.sample()       next token for each request that reached its end
        -> scheduler.update_from_output()  append tokens, finish requests, free blocks

The same objects run in one process here and, later, each behind ZeroMQ in its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from modkit.engine.config import ConfigError, EngineConfig
from modkit.kvcache import KVCacheManager, KVEventSink
from modkit.model import load_model
from modkit.model.config import ModelConfig
from modkit.model.decoder import CausalLM
from modkit.request import Request, RequestStatus, check_prompt
from modkit.sampler import SamplerOutput, SamplingState, get_sampler
from modkit.scheduler import EngineCoreOutput, ModelRunnerOutput, Scheduler, SchedulerOutput
from modkit.worker import ModelRunner, PagedKVCache, Worker
from modkit.worker.memory import plan_kv_cache

log = logging.getLogger(__name__)


def piecewise_tokens(config: EngineConfig) -> int | None:
    """The token budget the piecewise graphs cover, or None under cudagraph_mode="full_decode_only"."""
    return config.max_num_batched_tokens if config.cudagraph_mode == "full_and_piecewise" else None


def use_cuda_graphs(model: CausalLM, config: EngineConfig) -> bool:
    """Decode steps replay CUDA graphs on a GPU, unless enforce_eager or the attention backend cannot."""
    backend = model.attention_backend
    return model.lm_head.weight.is_cuda and not config.enforce_eager and backend.supports_cuda_graphs


@dataclass(slots=True)
class PendingStep:
    """A step whose forward and sampling are queued on the device."""

    scheduler_output: SchedulerOutput
    req_ids: list[str]  # the requests that sample, in the order of ``sampled``'s rows
    sampled: SamplerOutput | None  # still on the device


class EngineCore:
    def __init__(self, config: EngineConfig, kv_event_sink: KVEventSink | None = None) -> None:
        self.config = config
        self.model = load_model(
            config.model, dtype=config.dtype, device=config.device, attention_backend=config.attention_backend
        )
        self.device = self.model.lm_head.weight.device
        self.dtype = self.model.lm_head.weight.dtype
        limit = self.model.config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ConfigError(
                "max_model_len", f"must be <= the model's max_position_embeddings ({limit}), got {config.max_model_len}"
            )
        self.max_model_len = config.max_model_len or limit
        cuda_graphs = use_cuda_graphs(self.model, config)
        self.memory = plan_kv_cache(self.model, config, self.max_model_len, cuda_graphs=cuda_graphs)
        num_blocks = self.memory.num_blocks
        self.kv_cache = PagedKVCache.allocate(self.model.config, num_blocks, config.block_size, self.dtype, self.device)
        self.kv_manager, self.scheduler = self._scheduler(config, num_blocks, kv_event_sink)
        self.worker = Worker(ModelRunner(self.model, self.kv_cache))
        if cuda_graphs:
            runner = self.worker.runner
            graphs = runner.capture_cuda_graphs(config.max_num_seqs, self.max_model_len, piecewise_tokens(config))
            self.memory.cuda_graph_bytes = runner.cuda_graph_pool_bytes
            pieces = f"; piecewise for steps of up to {p.max_tokens} tokens" if (p := runner.piecewise) else ""
            log.info("CUDA graphs: %d for decode batches up to %d%s", len(graphs.sizes), graphs.max_batch, pieces)
        log.info(self.memory.describe(self.max_model_len))
        self.sampler = get_sampler(config.sampler, seed=config.seed)
        self.sampling_states: dict[str, SamplingState] = {}
        self.async_scheduling = config.async_scheduling  # may be switched between steps (scripts/profile_step.py)
        # Async scheduling on a GPU: a step planned ahead is also launched ahead, before the step
        # before it has brought its tokens to the host (it reads them on the device). On a CPU
        # the forward runs as it is launched, so that would only delay each step's outputs.
        self.launch_ahead = self.device.type == "cuda"
        self.num_planned_ahead = 0  # steps planned while the one before was on the device
        self.num_launched_ahead = 0  # of those, launched before its tokens were on the host

    def _scheduler(self, config: EngineConfig, num_blocks: int, kv_event_sink: KVEventSink | None) -> Any:
        """The KV cache manager and the scheduler: modkit's, or vLLM's own behind the same interfaces."""
        limits = (config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len)
        if config.scheduler == "vllm":  # vLLM's scheduler brings its own KV cache manager
            from modkit.vllm_v1.scheduler import VLLMScheduler

            scheduler = VLLMScheduler(
                num_blocks,
                config.block_size,
                *limits,
                enable_prefix_caching=config.enable_prefix_caching,
                policy=config.scheduling_policy,  # type: ignore[arg-type]
                kv_event_sink=kv_event_sink,
            )
            return scheduler.kv, scheduler
        if config.kv_cache_manager == "vllm":
            from modkit.vllm_v1.kv_cache_manager import VLLMKVCacheManager

            # Blocks become findable after the forward, as modkit's own do (vLLM's delay_cache_blocks):
            # caching at allocation would let a request preempted in the step that allocated its
            # blocks leave behind hashes of keys and values that were never computed.
            kv: Any = VLLMKVCacheManager(
                num_blocks, config.block_size, config.enable_prefix_caching, kv_event_sink, cache_at_allocation=False
            )
        else:
            kv = KVCacheManager(
                num_blocks,
                config.block_size,
                config.enable_prefix_caching,
                kv_event_sink,
                eviction_policy=config.eviction_policy,
            )
        return kv, Scheduler(kv, *limits, config.scheduling_policy)

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config

    def add_request(self, request: Request) -> None:
        request.eos_token_ids = request.eos_token_ids or self.model.config.eos_token_ids
        check_prompt(request.prompt_token_ids, request.sampling_params, self.model.config.vocab_size)
        self.scheduler.add_request(request)
        state = SamplingState.create(
            request.sampling_params, request.prompt_token_ids, self.device, request.eos_token_ids
        )
        state.output_token_ids = request.output_token_ids  # the same list: the sampler sees each new token
        self.sampling_states[request.req_id] = state

    def abort_requests(self, req_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        self.scheduler.finish_requests(req_ids, status)
        for req_id in req_ids:
            self.sampling_states.pop(req_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        return self.finish_step(self.launch_step())

    def plan_ahead(self) -> SchedulerOutput | None:
        """Async scheduling: plan the next step now, while the device runs the last one; None if
        that is off, the scheduler cannot (vLLM's is stepped in turn), or it would compute
        nothing for a running request."""
        scheduler = self.scheduler
        if not self.async_scheduling or not isinstance(scheduler, Scheduler) or not scheduler.can_plan_ahead():
            return None
        self.num_planned_ahead += 1
        return scheduler.schedule()

    def can_launch_ahead(self, plan: SchedulerOutput) -> bool:
        """Whether a plan made ahead may be launched now, before the step in flight is finished:
        its sampling must not read the tokens that step brings (penalties, ``min_tokens``)."""
        states = [self.sampling_states[r] for r in plan.num_scheduled_tokens if r in self.sampling_states]
        return self.launch_ahead and self.sampler.can_sample_ahead(states)

    def launch_step(self, scheduler_output: SchedulerOutput | None = None) -> PendingStep:
        """Schedule (or take a plan made ahead), and queue the forward and the sampling on the
        device; return without waiting.

        On a GPU the host is free until ``finish_step``: ``LLM`` plans the next step and
        detokenizes the previous step's tokens meanwhile.
        """
        if scheduler_output is None:
            scheduler_output = self.scheduler.schedule()
        result = self.worker.execute_model(scheduler_output)
        req_ids, logits = result.req_ids, result.logits
        if any(r not in self.sampling_states for r in req_ids):
            # Planned ahead, then ended (a stop string, an abort) before it ran: nothing to sample.
            rows = [i for i, r in enumerate(req_ids) if r in self.sampling_states]
            req_ids, logits = [req_ids[i] for i in rows], logits[rows]
        sampled = None
        if req_ids:
            states = [self.sampling_states[r] for r in req_ids]
            sampled = self.sampler.sample(logits, states)
            sampled.start_copy_to_host()
            self.worker.record_sampled_on_device(scheduler_output.step, req_ids, sampled.sampled_token_ids)
        return PendingStep(scheduler_output, req_ids, sampled)

    def finish_step(self, pending: PendingStep) -> list[EngineCoreOutput]:
        """Wait for the step's tokens (the one host copy), and update the scheduler with them."""
        sampled = pending.sampled.to_lists() if pending.sampled is not None else []
        tokens, logprobs = [s.token_id for s in sampled], [s.logprobs for s in sampled]
        # A step planned ahead computes them next (one launched ahead read them on the device).
        self.worker.record_sampled(pending.scheduler_output.step, pending.req_ids, tokens)
        runner_output = ModelRunnerOutput(pending.req_ids, tokens, logprobs)
        outputs = self.scheduler.update_from_output(pending.scheduler_output, runner_output)
        for out in outputs:
            if out.finish_reason is not None:
                self.sampling_states.pop(out.req_id, None)
        return outputs

    def stats(self) -> dict[str, float]:
        """Counters in vLLM's vocabulary, for ``LLM.stats()`` and the server's ``/stats``."""
        kv = self.kv_manager.stats()
        return {
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": kv.prefix_cache_queries,
            "prefix_cache_hits": kv.prefix_cache_hits,
            "kv_blocks_total": kv.num_blocks_total,
            "kv_blocks_free": kv.num_blocks_free,
            "kv_blocks_cached": kv.num_blocks_cached,
            "kv_cache_usage": kv.usage,
            "num_evictions": kv.num_evictions,
            "num_steps": self.scheduler.step_count,
            "num_steps_planned_ahead": self.num_planned_ahead,
            "num_steps_launched_ahead": self.num_launched_ahead,
            "kv_capacity_tokens": self.memory.kv_capacity_tokens,
            "num_cuda_graph_replays": self.worker.runner.num_cuda_graph_replays,
        }

    def check_invariants(self) -> None:
        self.scheduler.check_invariants()
        assert set(self.sampling_states) == set(self.scheduler.requests), "sampling state for every live request"
