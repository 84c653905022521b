"""The contract between the model and an attention backend.

A forward pass runs one *flat batch*: the new tokens of many requests laid end to end,
with no padding. Request ``s`` owns tokens ``query_start_loc[s] : query_start_loc[s+1]``
of the batch. Those tokens are the last ``query_len`` of its context, so a request whose
whole prompt is new, one that is half-way through a chunked prompt, and one that decodes
a single token look alike::

    request s's context (seq_lens[s] tokens), stored in its blocks
    |<--------- already in the KV cache --------->|<--- new in this batch --->|
    0                             seq_len - query_len                     seq_len

    flat batch:  [ s0 new tokens | s1 new tokens | s2 new tokens | ... ]

The KV cache of one layer is a single tensor::

    kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim)
              [0] keys, [1] values

Token ``t`` of request ``s`` lives in block ``block_tables[s, t // block_size]`` at offset
``t % block_size``. Its *slot* is ``block_id * block_size + offset``; ``slot_mapping``
gives the slot of every new token, which is where a backend writes its key and value.

A backend must, for every layer call: write the new keys and values to their slots, then
compute causal attention of each new token over its request's context (itself and every
earlier token, nothing later, nothing of another request). Grouped-query attention: query
head ``h`` reads key/value head ``h // (num_heads // num_kv_heads)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from modkit.registry import Registry


@dataclass(slots=True)
class AttentionMetadata:
    """Where each request's tokens sit in the flat batch and in the KV cache.

    The tensors live on the model's device. ``query_start_loc_cpu`` and ``seq_lens_cpu``
    are host copies of the same numbers, so backends that loop in Python need no device
    synchronisation.
    """

    query_start_loc: torch.Tensor  # (num_seqs + 1,) int32, cumulative query lengths
    seq_lens: torch.Tensor  # (num_seqs,) int32, context length after this step
    block_tables: torch.Tensor  # (num_seqs, max_blocks_per_seq) int32, unused entries 0
    slot_mapping: torch.Tensor  # (num_tokens,) int64, cache slot of each new token
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int
    # Per new token: which request it belongs to, and its index among that request's new
    # tokens. Derivable from query_start_loc; computed once per step for backends that
    # scatter tokens into a padded (num_seqs, max_query_len) layout.
    token_seq_idx: torch.Tensor | None = None  # (num_tokens,) int64
    token_offset: torch.Tensor | None = None  # (num_tokens,) int64
    # The most new tokens of any sequence: set here once, read by every layer's attention.
    max_query_len: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        num_seqs = len(self.seq_lens_cpu)
        assert len(self.query_start_loc_cpu) == num_seqs + 1, "one start per sequence, plus the end"
        assert self.slot_mapping.shape[0] == self.query_start_loc_cpu[-1], "one slot per new token"
        starts, longest = self.query_start_loc_cpu, 0
        for s in range(num_seqs):
            query_len = starts[s + 1] - starts[s]
            assert 0 < query_len <= self.seq_lens_cpu[s], "new tokens are the tail of the context"
            longest = max(longest, query_len)
        self.max_query_len = longest

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_cpu[-1]

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu)


def metadata_from_lengths(
    lengths: list[tuple[int, int]], block_tables: list[list[int]], block_size: int, device: torch.device | str
) -> AttentionMetadata:
    """Metadata for requests given as (tokens already cached, new tokens) with their block tables.

    For probes, tests and benchmarks; the worker builds its own from the scheduler's plan
    (``ModelRunner.prepare``).
    """
    width = max(len(t) for t in block_tables)
    starts, slots, seq_of_token, offsets = [0], [], [], []
    for s, ((cached, new), table) in enumerate(zip(lengths, block_tables, strict=True)):
        starts.append(starts[-1] + new)
        for i, pos in enumerate(range(cached, cached + new)):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
            seq_of_token.append(s)
            offsets.append(i)
    seq_lens = [cached + new for cached, new in lengths]

    def tensor(values: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return AttentionMetadata(
        query_start_loc=tensor(starts, torch.int32),
        seq_lens=tensor(seq_lens, torch.int32),
        block_tables=tensor([t + [0] * (width - len(t)) for t in block_tables], torch.int32),
        slot_mapping=tensor(slots, torch.int64),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
        block_size=block_size,
        token_seq_idx=tensor(seq_of_token, torch.int64),
        token_offset=tensor(offsets, torch.int64),
    )


class AttentionBackend(ABC):
    """One implementation of paged attention. Stateless: all state is in the arguments."""

    name: ClassVar[str]
    # True when ``forward`` can be captured in a CUDA graph: it launches a fixed sequence of
    # kernels for a given (num_seqs, max_query_len), reads lengths and block tables only on
    # the device, and never looks at ``seq_lens_cpu`` or ``query_start_loc_cpu`` values.
    supports_cuda_graphs: ClassVar[bool] = False

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # (num_tokens, num_heads, head_dim)
        key: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        value: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, num_kv_heads, head_dim)
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Store key/value in the cache, then return attention output (num_tokens, num_heads, head_dim)."""


def write_to_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter the new tokens' keys and values into their slots."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


ATTENTION_BACKENDS: Registry[AttentionBackend] = Registry("attention backend")
register_attention_backend = ATTENTION_BACKENDS.register
# One Triton kernel for a flat batch of prompt chunks and decodes (a CUDA GPU); imported on first use.
ATTENTION_BACKENDS.register_path("triton", "modkit.attention.triton_paged:TritonPagedAttention")


AUTO = "auto"  # not a backend: the best one this device can run (resolve_attention_backend)


def resolve_attention_backend(name: str, device: torch.device | str) -> str:
    """``name`` itself, or for "auto": "triton" on a CUDA GPU with Triton, else "torch_batched"."""
    if name != AUTO:
        return name
    if torch.device(device).type == "cuda":
        try:
            ATTENTION_BACKENDS.get("triton")
            return "triton"
        except ImportError:  # a torch build without Triton: the PyTorch backend still runs
            pass
    return "torch_batched"


def get_attention_backend(name: str, device: torch.device | str = "cpu") -> AttentionBackend:
    """An instance of the backend registered under ``name`` ("auto": see ``resolve_attention_backend``)."""
    return ATTENTION_BACKENDS.get(resolve_attention_backend(name, device))()


def attention_backends() -> list[str]:
    """Names of every registered backend, and "auto"."""
    return [*ATTENTION_BACKENDS.names(), AUTO]
