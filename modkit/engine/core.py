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
from typing import TYPE_CHECKING

from modkit.engine.config import ConfigError, EngineConfig, fit_max_model_len
from modkit.kvcache import KVCacheManager, KVEventSink
from modkit.model import resolve_model_path
from modkit.model.config import ModelConfig
from modkit.request import Request, RequestStatus, check_prompt
from modkit.sampler import Sampler, get_sampler
from modkit.scheduler import EngineCoreOutput, Scheduler, SchedulerOutput
from modkit.scheduler.interface import PlansAhead, SchedulerInterface
from modkit.scheduler.step import never_fits_message, waits_for_ever
from modkit.worker.executor import LaunchedStep, StepExecutor, grammar_backend, start_worker
from modkit.worker.tensor_parallel import check_tensor_parallel

if TYPE_CHECKING:
    from modkit.vllm_v1.kv_cache_manager import VLLMKVCacheManager

log = logging.getLogger(__name__)


class RequestNeverFits(ValueError):
    """A request that the whole KV cache cannot hold; the engine has aborted it (``req_id``)."""

    def __init__(self, req_id: str, message: str) -> None:
        super().__init__(message)
        self.req_id = req_id


class EngineCore:
    def __init__(self, config: EngineConfig, kv_event_sink: KVEventSink | None = None) -> None:
        self.config = config
        model_config = ModelConfig.from_pretrained(resolve_model_path(config.model))
        check_tensor_parallel(config.tensor_parallel_size, model_config, config.device)
        limit = model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ConfigError(
                "max_model_len", f"must be <= the model's max_position_embeddings ({limit}), got {config.max_model_len}"
            )
        self.max_model_len = config.max_model_len or limit
        # tensor_parallel_size N > 1: this process is rank 0 of N (modkit.worker.tensor_parallel).
        self.model, self.worker, self.memory = start_worker(config, self.max_model_len)
        self.ranks = self.worker.runner.tensor_parallel_ranks
        try:
            self._setup(config, kv_event_sink)
        except BaseException:
            self.close()
            raise

    def _setup(self, config: EngineConfig, kv_event_sink: KVEventSink | None) -> None:
        """Everything after the model and its worker: the scheduler, the KV cache manager, the sampler."""
        self.device = self.model.lm_head.weight.device
        self.dtype = self.model.lm_head.weight.dtype
        if (graphs := self.worker.runner.graphs) is not None:
            piece = self.worker.runner.piecewise
            pieces = f"; piecewise for steps of up to {piece.max_tokens} tokens" if piece else ""
            log.info("CUDA graphs: %d for decode batches up to %d%s", len(graphs.sizes), graphs.max_batch, pieces)
        self.max_model_len = self._fit_to_kv_cache(config, self.max_model_len)
        log.info(self.memory.describe(self.max_model_len))
        self.kv_manager, self.scheduler = self._scheduler(config, self.memory.num_blocks, kv_event_sink)
        sampler = get_sampler(config.sampler, seed=config.seed)
        self.executor = StepExecutor(
            self.worker, sampler, self.model.config.eos_token_ids, grammar_backend(config.model, self.model.config)
        )
        self.async_scheduling = config.async_scheduling  # may be switched between steps (scripts/profile_step.py)
        # Async scheduling on a GPU: a step planned ahead is also launched ahead, before the step
        # before it has brought its tokens to the host (it reads them on the device). On a CPU
        # the forward runs as it is launched, so that would only delay each step's outputs.
        self.launch_ahead = self.device.type == "cuda"
        self.num_planned_ahead = 0  # steps planned while the one before was on the device
        self.num_launched_ahead = 0  # of those, launched before its tokens were on the host

    def _fit_to_kv_cache(self, config: EngineConfig, max_model_len: int) -> int:
        """``max_model_len`` within what the KV cache holds: a request that the model allows but
        the whole cache cannot hold would wait for ever. ConfigError if the user set it; lowered
        (and logged) if it was the model's default."""
        sized_by = "num_kv_blocks" if config.num_kv_blocks is not None else "gpu_memory_utilization"
        explicit = config.max_model_len is not None
        fitted = fit_max_model_len(max_model_len, explicit, self.memory.num_blocks, config.block_size, sized_by)
        if fitted < max_model_len:
            log.warning(
                "max_model_len lowered from the model's %d to %d: the KV cache holds no more "
                "(%d blocks of %d); a larger cache (num_kv_blocks) allows longer requests",
                max_model_len,
                fitted,
                self.memory.num_blocks - 1,
                config.block_size,
            )
        return fitted

    def _scheduler(
        self, config: EngineConfig, num_blocks: int, kv_event_sink: KVEventSink | None
    ) -> tuple[KVCacheManager | VLLMKVCacheManager, SchedulerInterface]:
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
            kv: KVCacheManager | VLLMKVCacheManager = VLLMKVCacheManager(
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

    @property
    def sampler(self) -> Sampler:
        return self.executor.sampler

    def add_request(self, request: Request) -> None:
        request.eos_token_ids = request.eos_token_ids or self.model.config.eos_token_ids
        check_prompt(request.prompt_token_ids, request.sampling_params, self.model.config.vocab_size)
        self.scheduler.add_request(request)

    def abort_requests(self, req_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        self.scheduler.finish_requests(req_ids, status)
        self.executor.forget(req_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        return self.finish_step(self.launch_step())

    def plan_ahead(self) -> SchedulerOutput | None:
        """Async scheduling: plan the next step now, while the device runs the last one; None if
        that is off, the scheduler cannot (vLLM's is stepped in turn), or it would compute
        nothing for a running request."""
        scheduler = self.scheduler
        if not self.async_scheduling or not isinstance(scheduler, PlansAhead) or not scheduler.can_plan_ahead():
            return None
        self.num_planned_ahead += 1
        return self._schedule()

    def can_launch_ahead(self, plan: SchedulerOutput) -> bool:
        """Whether a plan made ahead may be launched now, before the step in flight is finished."""
        return self.launch_ahead and self.executor.can_launch_ahead(plan)

    def launch_step(self, scheduler_output: SchedulerOutput | None = None) -> LaunchedStep:
        """Schedule (or take a plan made ahead), and queue the forward and the sampling on the
        device; return without waiting.

        On a GPU the host is free until ``finish_step``: ``LLM`` plans the next step and
        detokenizes the previous step's tokens meanwhile.
        """
        if scheduler_output is None:
            scheduler_output = self._schedule()
        return self.executor.launch(scheduler_output)

    def _schedule(self) -> SchedulerOutput:
        """The scheduler's next plan; RequestNeverFits, the request aborted, if the plan shows that
        one can never fit (``waits_for_ever``): stepping on would repeat the same steps for ever."""
        plan = self.scheduler.schedule()
        if (stuck := waits_for_ever(self.scheduler, plan)) is not None:
            message = never_fits_message(stuck, self.scheduler)
            self.abort_requests([stuck.req_id])
            raise RequestNeverFits(stuck.req_id, message)
        return plan

    def finish_step(self, launched: LaunchedStep) -> list[EngineCoreOutput]:
        """Wait for the step's tokens (the one host copy), and update the scheduler with them."""
        runner_output = self.executor.finish(launched)
        outputs = self.scheduler.update_from_output(launched.plan, runner_output)
        self.executor.forget(out.req_id for out in outputs if out.finish_reason is not None)
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

    def close(self) -> None:
        """Stop the tensor-parallel ranks, if any (nothing else holds a process or a device)."""
        if self.ranks is not None:
            self.ranks.close()

    def check_invariants(self) -> None:
        self.scheduler.check_invariants()
        assert set(self.executor.states) <= set(self.scheduler.requests), "sampling states only of live requests"
