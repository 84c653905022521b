"""The worker: the KV cache tensors and the model runner that executes a step on them."""

from modkit.worker.greedy import greedy_generate
from modkit.worker.kv_cache import PagedKVCache, kv_cache_bytes_per_block
from modkit.worker.model_runner import ForwardInputs, ModelRunner, SequenceChunk
from modkit.worker.worker import CachedRequestState, StepResult, Worker

__all__ = [
    "CachedRequestState",
    "ForwardInputs",
    "ModelRunner",
    "PagedKVCache",
    "SequenceChunk",
    "StepResult",
    "Worker",
    "greedy_generate",
    "kv_cache_bytes_per_block",
]
