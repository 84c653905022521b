"""How many KV blocks a worker allocates, and what its memory goes to.

On a GPU, as in vLLM, ``gpu_memory_utilization`` is the share of the card's *total* memory
this engine may use, weights, activations and KV cache together (split evenly between the
workers that share one card), and never more than is free now::

    total x gpu_memory_utilization / workers on the card
      - weights                       counted from the parameters
      - activation peak               measured: one forward of a full step's token budget
                                      (max_num_batched_tokens, with logits for max_num_seqs
                                      rows) and the sampler's fullest path over those logits
      - CUDA graphs                   measured: the decoder stack at the largest decode batch, and at a
                                      whole token budget (piecewise graphs)
      = KV cache  ->  blocks of block_size tokens, all layers

On the CPU there is nothing to measure against: the cache takes a quarter of available
host memory, at most ``CPU_KV_CACHE_CAP_BYTES`` (notebooks run several engines side by side).
Either way the cache never holds more than every running request at full length needs.
A tensor-parallel rank plans for its own device, its slice of the weights and its KV heads
(on the CPU the ranks split the host's share); all ranks then take the smallest number of
blocks (``build_worker``). ``MemoryPlan.describe()`` is the line the engine logs at start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from modkit.engine.config import ConfigError, EngineConfig
from modkit.model.decoder import CausalLM
from modkit.sampler import SamplingState, get_sampler
from modkit.sampling_params import SamplingParams
from modkit.worker.cuda_graphs import capture_sizes
from modkit.worker.kv_cache import PagedKVCache, kv_cache_bytes_per_block
from modkit.worker.model_runner import ModelRunner, SequenceChunk

CPU_KV_CACHE_CAP_BYTES = 512 * 2**20
GiB = 2**30


@dataclass(slots=True)
class MemoryPlan:
    """The sizing decision and the numbers behind it (bytes)."""

    device: str
    dtype: str
    num_blocks: int  # block 0 (the null block) included
    block_size: int
    block_bytes: int  # one block, all layers, keys and values
    weights_bytes: int
    activation_peak_bytes: int  # measured on a GPU; 0 on the CPU, where nothing is measured
    cuda_graph_bytes: int  # measured reserve for the graphs' memory pool; 0 without graphs
    budget_bytes: int | None  # what was left for the cache; None when num_kv_blocks was given
    rule: str  # how the budget was set

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the cache holds, all requests together (the null block excluded)."""
        return (self.num_blocks - 1) * self.block_size

    def describe(self, max_model_len: int) -> str:
        concurrency = self.kv_capacity_tokens / max_model_len
        parts = [
            f"KV cache: {self.kv_capacity_tokens:,} tokens ({self.num_blocks - 1:,} blocks of {self.block_size}, "
            f"{self.kv_bytes / GiB:.2f} GiB {self.dtype} on {self.device}; {self.rule})",
            f"weights {self.weights_bytes / GiB:.2f} GiB",
        ]
        if self.activation_peak_bytes:
            parts.append(f"activation peak {self.activation_peak_bytes / GiB:.2f} GiB (measured)")
        if self.cuda_graph_bytes:
            parts.append(f"CUDA graphs {self.cuda_graph_bytes / GiB:.2f} GiB")
        parts.append(f"{concurrency:.1f}x concurrency at {max_model_len:,} tokens a request")
        return "; ".join(parts)


def plan_kv_cache(
    model: CausalLM, cfg: EngineConfig, max_model_len: int, *, num_sharing: int = 1, cuda_graphs: bool = False
) -> MemoryPlan:
    """Decide the number of KV blocks for ``model`` under ``cfg`` (see the module docstring)."""
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    tp_size = model.tp.size
    per_block = kv_cache_bytes_per_block(model.config, cfg.block_size, dtype, tp_size)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = MemoryPlan(
        str(device), str(dtype).removeprefix("torch."), 0, cfg.block_size, per_block, weights, 0, 0, None, ""
    )
    if cfg.num_kv_blocks is not None:
        plan.num_blocks, plan.rule = cfg.num_kv_blocks, "num_kv_blocks"
        return plan
    # Never more than every running request at full length needs (plus the null block).
    enough = cfg.max_num_seqs * -(-max_model_len // cfg.block_size) + 1
    if device.type == "cuda":
        plan.activation_peak_bytes = measure_activation_peak(model, cfg, max_model_len)
        if cuda_graphs:
            plan.cuda_graph_bytes = measure_decode_peak(model, cfg, capture_sizes(cfg.max_num_seqs)[-1])
            if cfg.cudagraph_mode == "full_and_piecewise":
                # The piecewise graphs' pool: the stack over a whole token budget, plus each layer's
                # q, k and v, kept for the attention that runs between the pieces.
                c, tokens = model.config, cfg.max_num_batched_tokens
                qkv = c.num_hidden_layers * tokens * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
                plan.cuda_graph_bytes += measure_decode_peak(model, cfg, tokens) + qkv * dtype.itemsize
        reserved = plan.activation_peak_bytes + plan.cuda_graph_bytes
        free, total = torch.cuda.mem_get_info(device)
        share = int(total * cfg.gpu_memory_utilization / num_sharing) - weights
        budget = min(share, free) - reserved
        plan.rule = f"gpu_memory_utilization {cfg.gpu_memory_utilization} of {total / GiB:.1f} GiB"
        if num_sharing > 1:
            plan.rule += f" shared by {num_sharing} workers"
    else:
        # Tensor-parallel ranks on the CPU share the host too: together they hold what one would.
        budget = min(int(_available_host_memory() * 0.25 / num_sharing), CPU_KV_CACHE_CAP_BYTES) // tp_size
        plan.rule = f"a quarter of free host memory, at most {CPU_KV_CACHE_CAP_BYTES / GiB:.1f} GiB"
        if tp_size > 1:
            plan.rule += f", shared by {tp_size} tensor-parallel ranks"
    plan.budget_bytes = budget
    if budget < 2 * per_block:
        raise ConfigError(
            "gpu_memory_utilization" if device.type == "cuda" else "num_kv_blocks",
            f"no memory left for a KV cache: {budget / GiB:.2f} GiB after weights ({weights / GiB:.2f} GiB) "
            f"and activations ({(plan.activation_peak_bytes + plan.cuda_graph_bytes) / GiB:.2f} GiB)",
        )
    plan.num_blocks = max(2, min(enough, budget // per_block))
    if plan.num_blocks == enough:
        plan.rule += "; capped at max_num_seqs requests of max_model_len"
    return plan


@torch.inference_mode()
def measure_activation_peak(model: CausalLM, cfg: EngineConfig, max_model_len: int) -> int:
    """Peak bytes of one full step beyond the weights: a forward of max_num_batched_tokens tokens
    with a logit row for each of max_num_seqs requests, then sampling with top-k, top-p,
    penalties and 20 logprobs (the sampler's fullest path) over those rows."""
    device = model.lm_head.weight.device
    num_tokens = cfg.max_num_batched_tokens
    # As many prompt chunks as requests can sample (each ends its prompt and wants a logit row),
    # none longer than the model allows.
    num_seqs = max(min(cfg.max_num_seqs, num_tokens), -(-num_tokens // max_model_len))
    lengths = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
    runner, chunks = _scratch(model, cfg, lengths)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    logits = runner.execute(chunks)
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1, logprobs=20)
    states = [SamplingState.create(params, [0], device) for _ in chunks]
    get_sampler("default", seed=0).sample(logits, states).to_lists()
    peak = torch.cuda.max_memory_allocated(device) - base
    del runner, chunks, logits
    torch.cuda.empty_cache()
    return peak


@torch.inference_mode()
def measure_decode_peak(model: CausalLM, cfg: EngineConfig, batch: int) -> int:
    """Peak bytes of the decoder stack (no vocabulary projection) over ``batch`` decode tokens:
    what the CUDA graphs' private memory pool keeps."""
    device = model.lm_head.weight.device
    runner, chunks = _scratch(model, cfg, [1] * batch)
    inputs = runner.prepare(chunks)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    model.model(inputs.input_ids, inputs.positions, runner.kv_cache.layers, inputs.metadata)
    peak = torch.cuda.max_memory_allocated(device) - base
    del runner, chunks, inputs
    torch.cuda.empty_cache()
    return peak


def _scratch(model: CausalLM, cfg: EngineConfig, lengths: list[int]) -> tuple[ModelRunner, list[SequenceChunk]]:
    """A runner over a scratch cache just big enough for prompts of these lengths, and their chunks."""
    bs = cfg.block_size
    tables, next_block = [], 1  # block 0 is the null block
    for n in lengths:
        need = -(-n // bs)
        tables.append(list(range(next_block, next_block + need)))
        next_block += need
    device = model.lm_head.weight.device
    cache = PagedKVCache.allocate(model.config, next_block, bs, model.lm_head.weight.dtype, device, model.tp.size)
    return ModelRunner(model, cache), [SequenceChunk([0] * n, 0, t) for n, t in zip(lengths, tables, strict=True)]


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
