"""modkit: a Jupyter-first kit for learning how LLM serving engines work.

The package is laid out one subpackage per component of a serving engine:

- ``modkit.model``: model configuration, checkpoint loading, and the decoder
  (Qwen2/Qwen2.5, Qwen3, Llama 3.x) that runs over a paged KV cache.
- ``modkit.attention``: attention backends behind one interface, with a
  pure-PyTorch reference backend.
- ``modkit.worker``: the KV cache tensors and the model runner that turns a
  step's work into one flat forward pass.
"""

from modkit.engine.llm import LLM
from modkit.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams"]
