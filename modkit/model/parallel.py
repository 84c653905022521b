"""Tensor parallelism inside the model: which slice of each weight a rank holds, and the all-reduce.

With ``tensor_parallel_size`` N a worker runs as N ranks, each holding 1/N of every large
weight matrix of every layer, split so that each rank computes its part of a layer alone and
the ranks meet once per attention block and once per MLP (Megatron-LM's layout, vLLM's too)::

    column-parallel: q_proj, k_proj, v_proj,     rank r holds rows r*out/N .. (r+1)*out/N - 1:
                     gate_proj, up_proj          its attention heads, its KV heads, its share of I
    row-parallel:    o_proj, down_proj           rank r holds the matching input columns, so
                                                 o_proj(x) is a *partial* sum on every rank
                                                 -> all-reduce (sum) over the ranks

    x (T, hidden), the same on every rank
      -> q/k/v for this rank's heads -> attention over this rank's KV heads -> o_proj, partial
      -> all-reduce: x + attn(x), the same on every rank again
      -> gate/up for this rank's share of I -> silu * up -> down_proj, partial
      -> all-reduce: ... + mlp(...), the same on every rank again

Everything else is replicated: the embeddings, the norms, Qwen3's q/k norms (one per head
dimension) and the ``lm_head``. vLLM also shards the vocabulary (``VocabParallelEmbedding``,
an all-gather of the logits); modkit keeps the whole head on every rank, and only rank 0
computes logits.

Parameter names stay Hugging Face's: a rank's ``q_proj.weight`` is simply a smaller tensor,
loaded from the checkpoint's ``q_proj.weight`` by ``shard_slice`` (``modkit.model.loader``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

# Hugging Face names of the layers each rank holds a slice of, and the dimension it is cut along.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output rows (dim 0)
ROW_PARALLEL = ("o_proj", "down_proj")  # input columns (dim 1)


@dataclass(slots=True)
class TensorParallel:
    """This process's place among the ranks of one worker: ``rank`` of ``size``.

    ``size == 1`` is a model on one device, with no collectives at all. With ``size > 1``
    the forward calls ``torch.distributed.all_reduce`` on the default process group, which
    every rank has joined (``modkit.worker.tensor_parallel``).
    """

    rank: int = 0
    size: int = 1
    num_all_reduces: int = 0  # counted, for lessons and tests: two per layer per forward

    def __post_init__(self) -> None:
        assert self.size >= 1 and 0 <= self.rank < self.size, f"rank {self.rank} of {self.size}"

    def split(self, total: int, what: str) -> int:
        """This rank's share of ``total`` (heads, KV heads, intermediate size): ``total / size``."""
        if total % self.size != 0:
            raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size ({self.size})")
        return total // self.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; every rank gets the sum. Nothing to do on one rank."""
        if self.size > 1:
            dist.all_reduce(x)
            self.num_all_reduces += 1
        return x

    def smallest(self, value: int, device: torch.device) -> int:
        """The smallest ``value`` over the ranks (each rank's KV cache size: all take the smallest)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


class RowParallelLinear(nn.Linear):
    """A linear layer whose input features are split across the ranks: each rank multiplies its
    slice of the input by its slice of the weight's columns, and the all-reduce adds the partial
    results. ``weight`` is ``(out_features, in_features / size)`` on every rank; no bias (the
    models modkit runs have none on o_proj and down_proj; a bias would be added once, after)."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel) -> None:
        super().__init__(tp.split(in_features, "in_features"), out_features, bias=False)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, in_features / size)
        return self.tp.all_reduce(F.linear(x, self.weight))  # (T, out_features), the same on every rank


def shard_slice(name: str, shape: tuple[int, ...], tp: TensorParallel) -> tuple[slice, ...]:
    """The part of the checkpoint tensor ``name`` (of ``shape``) that rank ``tp.rank`` holds.

    Column-parallel weights and biases: a block of rows; row-parallel weights: a block of
    columns; anything else: the whole tensor (replicated).
    """
    whole = tuple(slice(None) for _ in shape)
    if tp.size == 1:
        return whole
    module = name.split(".")[-2]  # "model.layers.0.self_attn.q_proj.weight" -> "q_proj"
    dim = 0 if module in COLUMN_PARALLEL else 1 if module in ROW_PARALLEL else None
    if dim is None:
        return whole
    part = tp.split(shape[dim], name)
    cut = slice(tp.rank * part, (tp.rank + 1) * part)
    return tuple(cut if d == dim else slice(None) for d in range(len(shape)))
