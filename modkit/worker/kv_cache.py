"""The KV cache tensors: the memory that paged attention reads and writes.

The worker owns these tensors; which block belongs to which request is decided elsewhere
(the KV cache manager) and arrives as block tables. Per layer, one tensor::

    (2, num_blocks, block_size, num_kv_heads, head_dim)
     ^ 0 = keys, 1 = values

A block holds ``block_size`` consecutive tokens of one request, in every layer at once:
block ``b`` is ``kv[:, b]`` in each layer's tensor.

With tensor parallelism each rank holds its own cache of the same ``num_blocks`` blocks, over
its ``num_kv_heads / tensor_parallel_size`` KV heads: block ``b`` of a request is block ``b``
on every rank, so the block tables, the scheduler and the KV cache manager are the same for
any number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modkit.model.config import ModelConfig


def kv_cache_bytes_per_block(
    config: ModelConfig, block_size: int, dtype: torch.dtype, tensor_parallel_size: int = 1
) -> int:
    """Bytes one block takes across all layers (keys and values), on one tensor-parallel rank."""
    num_kv_heads = config.num_key_value_heads // tensor_parallel_size
    per_token = 2 * num_kv_heads * config.head_dim * config.num_hidden_layers
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


@dataclass(slots=True)
class PagedKVCache:
    """Per-layer KV tensors plus the geometry needed to address them."""

    layers: list[torch.Tensor]  # one (2, num_blocks, block_size, num_kv_heads / tp size, head_dim) per layer
    num_blocks: int
    block_size: int

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        tensor_parallel_size: int = 1,
    ) -> PagedKVCache:
        """Zero-filled cache for ``num_blocks`` blocks of ``block_size`` tokens (one rank's KV heads)."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        num_kv_heads = config.num_key_value_heads // tensor_parallel_size
        shape = (2, num_blocks, block_size, num_kv_heads, config.head_dim)
        layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        return cls(layers=layers, num_blocks=num_blocks, block_size=block_size)

    @property
    def num_tokens(self) -> int:
        """How many tokens fit in the cache, all requests together."""
        return self.num_blocks * self.block_size
