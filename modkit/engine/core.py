"""The engine core: one step = schedule, run the model, sample, update.

::

    scheduler.schedule()          which requests compute how many tokens; blocks allocated
        -> worker.execute_model() the flat forward over exactly those blocks -> logits
        -> sampler.sample()       next token for each request that reached its end
        -> scheduler.update_from_output()  append tokens, finish requests, free blocks

The same objects run in one process here and, later, each behind ZeroMQ in its own.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from modkit.engine.config import ConfigError, EngineConfig
from modkit.kvcache import KVCacheManager, KVEventSink
from modkit.model import load_model
from modkit.model.config import ModelConfig
from modkit.model.decoder import CausalLM
from modkit.request import Request, RequestStatus, check_prompt
from modkit.sampler import SamplingState, get_sampler
from modkit.scheduler import EngineCoreOutput, ModelRunnerOutput, Scheduler
from modkit.worker import ModelRunner, PagedKVCache, Worker, kv_cache_bytes_per_block

CPU_KV_CACHE_CAP_BYTES = 512 * 2**20  # a laptop runs several engines side by side in notebooks


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
        num_blocks = config.num_kv_blocks or num_blocks_from_memory(self.model, config, self.max_model_len)
        self.kv_cache = PagedKVCache.allocate(self.model.config, num_blocks, config.block_size, self.dtype, self.device)
        self.kv_manager, self.scheduler = self._scheduler(config, num_blocks, kv_event_sink)
        self.worker = Worker(ModelRunner(self.model, self.kv_cache))
        self.sampler = get_sampler(config.sampler, seed=config.seed)
        self.sampling_states: dict[str, SamplingState] = {}

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
        scheduler_output = self.scheduler.schedule()
        result = self.worker.execute_model(scheduler_output)
        sampled = []
        if result.req_ids:
            states = [self.sampling_states[r] for r in result.req_ids]
            sampled = self.sampler.sample(result.logits, states).to_lists()  # the one host copy
        runner_output = ModelRunnerOutput(result.req_ids, [s.token_id for s in sampled], [s.logprobs for s in sampled])
        outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
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
        }

    def check_invariants(self) -> None:
        self.scheduler.check_invariants()
        assert set(self.sampling_states) == set(self.scheduler.requests), "sampling state for every live request"


def num_blocks_from_memory(model: CausalLM, cfg: EngineConfig, max_model_len: int, num_sharing: int = 1) -> int:
    """KV blocks that fit in the memory left after the weights (and, on a GPU, activations).

    On a GPU, as vLLM does, ``kv_cache_memory_fraction`` is a share of the card's *total*
    memory for this engine (weights, activations and KV cache together), split evenly
    between ``num_sharing`` workers on one card; never more than is free now.
    """
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    per_block = kv_cache_bytes_per_block(model.config, cfg.block_size, dtype)
    # Never more than every running request at full length needs.
    enough = cfg.max_num_seqs * -(-max_model_len // cfg.block_size) + 1
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        share = int(total * cfg.kv_cache_memory_fraction / num_sharing) - weights
        budget = min(share, free) - _activation_bytes(model.config, cfg, dtype)
    else:
        budget = min(int(_available_host_memory() * 0.25 / num_sharing), CPU_KV_CACHE_CAP_BYTES)
    if budget < 2 * per_block:
        raise ConfigError("num_kv_blocks", f"no memory left for a KV cache ({budget} bytes free after weights)")
    return max(2, min(enough, budget // per_block))


def _activation_bytes(m: ModelConfig, cfg: EngineConfig, dtype: torch.dtype) -> int:
    """A generous estimate of one step's activation peak (measured sizing comes with the GPU work)."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = (
        4 * m.hidden_size + 3 * m.intermediate_size + (m.num_attention_heads + 2 * m.num_key_value_heads) * m.head_dim
    )
    logits = min(cfg.max_num_seqs, cfg.max_num_batched_tokens) * m.vocab_size * 4 * 3
    return 2 * cfg.max_num_batched_tokens * per_token * elem + logits


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
