"""modkit: a Jupyter-first kit for learning how LLM serving engines work.

The package is laid out one subpackage per component of a serving engine:

- ``modkit.model``: model configuration, checkpoint loading, and the decoder
  (Qwen2/Qwen2.5, Qwen3, Llama 3.x) that runs over a paged KV cache.
- ``modkit.attention``: attention backends behind one interface, with a
  pure-PyTorch reference backend.
- ``modkit.worker``: the KV cache tensors and the model runner that turns a
  step's work into one flat forward pass.
- ``modkit.kvcache``, ``modkit.scheduler``, ``modkit.sampler``, ``modkit.router``,
  ``modkit.frontend``: the other components; each has a ``service.py`` that runs it as
  its own process of the pipeline.
- ``modkit.engine``: the same components in one process (``LLM``, ``AsyncEngine``).
- ``modkit.pipeline``: ``Pipeline``, which launches the six-process pipeline.
- ``modkit.transport``: the only code that speaks ZeroMQ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modkit.engine.llm import LLM
    from modkit.pipeline.launcher import Pipeline
    from modkit.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "Pipeline", "SamplingParams"]


def __getattr__(name: str) -> Any:
    # NOTE: imported on first use, so a component process that needs no torch (the router,
    # the KV cache manager) starts in a fraction of a second instead of importing it.
    if name == "LLM":
        from modkit.engine.llm import LLM

        return LLM
    if name == "Pipeline":
        from modkit.pipeline.launcher import Pipeline

        return Pipeline
    if name == "SamplingParams":
        from modkit.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'modkit' has no attribute {name!r}")
