"""modkit: a Jupyter-first kit for learning how LLM serving engines work.

The package is laid out one subpackage per component of a serving engine:

- ``modkit.model``: model configuration, checkpoint loading, and the decoder
  (Qwen2/Qwen2.5, Qwen3, Llama 3.x) that runs over a paged KV cache.
- ``modkit.attention``: attention backends behind one interface, with a
  pure-PyTorch reference backend.
- ``modkit.worker``: the KV cache tensors and the model runner that turns a
  step's work into one flat forward pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modkit.engine.llm import LLM
    from modkit.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    # NOTE: imported on first use, so a component process that needs no torch (the router,
    # the KV cache manager) starts in a fraction of a second instead of importing it.
    if name == "LLM":
        from modkit.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from modkit.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'modkit' has no attribute {name!r}")
