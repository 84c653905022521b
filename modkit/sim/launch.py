"""What a launch of a configuration gives each worker, found without launching: its KV pool and ``max_model_len``.

A simulation serves on the pool a live launch would have. A workload recorded from a live run
carries it (``workload_from_trace``: the trace's ``num_blocks`` and ``max_model_len``); for
made-up traffic it is worked out here, as the launch works it out:

- ``num_kv_blocks`` given: that many blocks a worker;
- not given: each worker sizes its pool from memory (``modkit.worker.memory.plan_kv_cache``).
  On the CPU that rule reads only the model's shapes, the settings and the host's available
  memory, so the simulation asks the same function, about the same model built on torch's
  ``meta`` device (its shapes, no memory). On a GPU the pool depends on the card's free
  memory and on activation peaks measured at start, which a simulation cannot know:
  ``device="cuda"`` without ``num_kv_blocks`` is refused (a live trace's ``meta["num_blocks"]``
  says what a launch got). A configuration that names no device is sized as on the CPU.

Then ``max_model_len`` (the model's own limit unless set) is fitted to the pool as a launch
fits it: lowered to what the pool holds, or refused if it was set explicitly.
"""

from __future__ import annotations

import dataclasses

import torch

from modkit.attention import get_attention_backend
from modkit.config import ConfigError, PipelineConfig
from modkit.engine.config import fit_max_model_len
from modkit.model import resolve_model_path
from modkit.model.config import ModelConfig
from modkit.model.decoder import CausalLM
from modkit.model.loader import parse_dtype
from modkit.worker.memory import plan_kv_cache


def launch_pool(config: PipelineConfig, explicit_max_model_len: bool) -> tuple[int, int]:
    """Each worker's number of KV blocks and the ``max_model_len`` a launch of ``config`` would have.

    ``explicit_max_model_len``: whether the learner set ``config.max_model_len`` (refused if the
    pool cannot hold it) rather than it coming from a recording (lowered, as a launch lowers
    the model's default)."""
    if config.device is not None and config.device != "cpu" and config.num_kv_blocks is None:
        raise ConfigError(
            "num_kv_blocks",
            f"a launch on {config.device} sizes each worker's KV pool from the card's free memory, which a "
            "simulation cannot know: give num_kv_blocks (a live run's trace.meta['num_blocks'] says what it got)",
        )
    on_cpu = dataclasses.replace(config, device="cpu")  # device None: the CPU, and its default model
    model_config = None
    if config.num_kv_blocks is None or config.max_model_len is None:
        model_config = ModelConfig.from_pretrained(resolve_model_path(on_cpu.resolved_model()))
    max_model_len = config.max_model_len
    if max_model_len is None:
        assert model_config is not None
        max_model_len = model_config.max_position_embeddings
    num_blocks = config.num_kv_blocks
    if num_blocks is None:
        assert model_config is not None
        num_blocks = cpu_num_blocks(on_cpu, model_config, max_model_len)
    sized_by = "num_kv_blocks" if config.num_kv_blocks is not None else "gpu_memory_utilization"
    fitted = fit_max_model_len(max_model_len, explicit_max_model_len, num_blocks, config.block_size, sized_by)
    return num_blocks, fitted


def cpu_num_blocks(config: PipelineConfig, model_config: ModelConfig, max_model_len: int) -> int:
    """The blocks each of ``config.num_workers`` workers of one CPU host allocates (``plan_kv_cache``)."""
    engine = config.to_engine_config()
    with torch.device("meta"):  # the model's parameters as shapes: nothing allocated, nothing loaded
        model = CausalLM(model_config, get_attention_backend(engine.attention_backend, "cpu"))
    model.to(parse_dtype(engine.dtype or "float32"))
    return plan_kv_cache(model, engine, max_model_len, num_sharing=config.num_workers).num_blocks
