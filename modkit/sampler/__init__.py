"""The sampler: turns a step's logits into tokens. One interface (``interface.py``), a registry, implementations.

Importing this package registers the built-in samplers ("default", "per_request").
"""

from modkit.sampler import per_request as _per_request  # noqa: F401  (registers "per_request")
from modkit.sampler import sampler as _sampler  # noqa: F401  (registers "default")
from modkit.sampler.grammar import GrammarBackend, RequestGrammar
from modkit.sampler.interface import (
    LogprobsTensors,
    SampledToken,
    Sampler,
    SamplerOutput,
    SamplingState,
    TokenLogprobs,
    get_sampler,
    register_sampler,
    samplers,
)
from modkit.sampler.metadata import SamplingMetadata
from modkit.sampler.sampler import DefaultSampler

__all__ = [
    "DefaultSampler",
    "GrammarBackend",
    "LogprobsTensors",
    "RequestGrammar",
    "SampledToken",
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "SamplingState",
    "TokenLogprobs",
    "get_sampler",
    "register_sampler",
    "samplers",
]
