"""Attention backends: one interface (``interface.py``), a registry, and implementations.

Importing this package registers the built-in backends.
"""

from modkit.attention import torch_batched as _torch_batched  # noqa: F401  (registers "torch_batched")
from modkit.attention import torch_ref as _torch_ref  # noqa: F401  (registers "torch_ref")
from modkit.attention.interface import (
    AttentionBackend,
    AttentionMetadata,
    attention_backends,
    get_attention_backend,
    register_attention_backend,
    resolve_attention_backend,
    write_to_kv_cache,
)

DEFAULT_ATTENTION_BACKEND = "torch_ref"

__all__ = [
    "DEFAULT_ATTENTION_BACKEND",
    "AttentionBackend",
    "AttentionMetadata",
    "attention_backends",
    "get_attention_backend",
    "register_attention_backend",
    "resolve_attention_backend",
    "write_to_kv_cache",
]
