"""The model: its configuration, its decoder code, and checkpoint loading."""

from modkit.model.config import ModelConfig, UnsupportedModelError
from modkit.model.decoder import CausalLM
from modkit.model.loader import (
    CheckpointMismatchError,
    ModelNotFoundError,
    default_dtype,
    embedded_model_dir,
    encode_chat,
    load_model,
    load_tokenizer,
    parse_dtype,
    resolve_model_path,
)

__all__ = [
    "CausalLM",
    "CheckpointMismatchError",
    "ModelConfig",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "default_dtype",
    "embedded_model_dir",
    "encode_chat",
    "load_model",
    "load_tokenizer",
    "parse_dtype",
    "resolve_model_path",
]
