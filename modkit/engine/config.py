"""The engine's configuration: one typed object, validated once, never changed afterwards."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field


CUDAGRAPH_MODES = ("full_and_piecewise", "full_decode_only")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str | Path | None = None  # local folder, hub id, or None for the embedded tiny model
    dtype: str | None = None  # None: float32 on CPU, bfloat16 (or float16) on GPU
    device: str | None = None  # None: cuda if available, else cpu
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: sized from free memory
    max_num_batched_tokens: int = 2048  # token budget of one step
    max_num_seqs: int = 256  # requests running at once
    enable_prefix_caching: bool = True
    # None: the model's max_position_embeddings, lowered to what the KV cache holds if that is less;
    # a value the KV cache cannot hold is refused (ConfigError) when the engine sizes its cache.
    max_model_len: int | None = None
    # "modkit", or "vllm": vLLM's own V1 scheduler (with its own KV cache manager) or KV cache
    # manager (under modkit's scheduler), behind modkit's interfaces (modkit.vllm_v1; needs vllm).
    scheduler: str = "modkit"
    kv_cache_manager: str = "modkit"
    scheduling_policy: str = "fcfs"
    eviction_policy: str = "lru"
    sampler: str = "default"
    attention_backend: str = "auto"  # "triton" on a CUDA GPU with Triton, else "torch_batched"
    # Share of the GPU's total memory for this engine (weights, activations, KV cache), when
    # num_kv_blocks is None (modkit.worker.memory). The CPU has its own rule.
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False  # True: no CUDA graphs at all (they are captured only on a GPU)
    # vLLM's name: "full_and_piecewise" (decode steps in one graph each, steps with prompt chunks
    # in pieces cut at attention) or "full_decode_only" (prompt steps eager).
    cudagraph_mode: str = "full_and_piecewise"
    async_scheduling: bool = True  # plan step N+1 while the device runs step N (vLLM's async scheduling)
    seed: int = 0  # seeds unseeded random sampling
    # Ranks the model is split over, one device each (modkit.worker.tensor_parallel); must divide
    # the model's attention heads and KV heads. 1: the whole model on one device.
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        positive = ("block_size", "max_num_batched_tokens", "max_num_seqs", "tensor_parallel_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 2):
            raise ConfigError(
                "num_kv_blocks", f"must be None or an integer >= 2 (block 0 is reserved), got {self.num_kv_blocks!r}"
            )
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ConfigError("max_model_len", f"must be None or an integer >= 2, got {self.max_model_len!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cudagraph_mode not in CUDAGRAPH_MODES:
            choices = ", ".join(CUDAGRAPH_MODES)
            raise ConfigError("cudagraph_mode", f"must be one of {choices}, got {self.cudagraph_mode!r}")
        for flag in ("enforce_eager", "async_scheduling"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(flag, f"must be True or False, got {getattr(self, flag)!r}")
        for name in ("scheduler", "kv_cache_manager"):
            if getattr(self, name) not in ("modkit", "vllm"):
                raise ConfigError(name, f"must be 'modkit' or 'vllm', got {getattr(self, name)!r}")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ConfigError("device", f"must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}")


def fit_max_model_len(max_model_len: int, explicit: bool, num_blocks: int, block_size: int, sized_by: str) -> int:
    """``max_model_len`` made to fit a KV pool of ``num_blocks`` blocks (block 0, the null block,
    holds nothing), so that any request the model allows can run alone in the whole pool.

    A length the user set (``explicit``) that does not fit is refused with ConfigError, as vLLM
    refuses it; one taken from the model's default is lowered to what the pool holds (the
    caller says so). ``sized_by`` names the setting that decided the pool's size, for the
    message: "num_kv_blocks" or "gpu_memory_utilization".
    """
    capacity = (num_blocks - 1) * block_size
    if max_model_len <= capacity:
        return max_model_len
    if explicit:
        needed = -(-max_model_len // block_size) + 1
        more = f"num_kv_blocks={needed} or more"
        if sized_by != "num_kv_blocks":
            more = f"more memory for it ({sized_by}, or {more})"
        raise ConfigError(
            "max_model_len",
            f"({max_model_len}) is larger than the maximum number of tokens that can be stored in the KV cache "
            f"({capacity}: {num_blocks - 1} blocks of {block_size}, block 0 is reserved). "
            f"Lower max_model_len to {capacity} or less, or give the KV cache {more}.",
        )
    if capacity < 2:
        raise ConfigError("num_kv_blocks", f"a KV cache of {capacity} token(s) cannot hold a request")
    return capacity
