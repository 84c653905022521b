"""The worker: the KV cache tensors and the model runner that executes a step on them."""

from modkit.worker.greedy import greedy_generate
from modkit.worker.kv_cache import PagedKVCache, kv_cache_bytes_per_block
from modkit.worker.model_runner import ForwardInputs, ModelRunner, SequenceChunk

__all__ = [
    "ForwardInputs",
    "ModelRunner",
    "PagedKVCache",
    "SequenceChunk",
    "greedy_generate",
    "kv_cache_bytes_per_block",
]
