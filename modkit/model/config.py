"""The model's shape, read from a Hugging Face ``config.json``.

One frozen dataclass covers every architecture modkit runs. The decoder in
``modkit.model.decoder`` reads only this object, never the raw JSON, so the
differences between Qwen2, Qwen3 and Llama are spelled out in one place:

=================  ==========  ===========  ==========
                   q/k/v bias  q/k RMSNorm  RoPE
=================  ==========  ===========  ==========
Qwen2 / Qwen2.5    yes         no           default
Qwen3              no          yes          default
Llama 3.x          no          no           llama3 scaling
=================  ==========  ===========  ==========
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its settings is not one modkit runs."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    Field names follow Hugging Face's so that a reader can hold the two side by side.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # < num_attention_heads means grouped-query attention
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # {"rope_type": "linear" | "llama3", "factor": ..., ...}; None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q_proj, k_proj, v_proj (Qwen2 always has them)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.architecture!r} is not supported; modkit runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_scaling type {rope_type!r} is not supported; modkit supports {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @property
    def num_queries_per_kv(self) -> int:
        """How many query heads share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from the contents of a Hugging Face ``config.json``.

        Accepts both the transformers 4.x form (``rope_theta`` and ``rope_scaling`` at
        the top level) and the 5.x form (both inside ``rope_parameters``).
        """
        architectures = hf.get("architectures") or []
        if len(architectures) != 1:
            raise UnsupportedModelError(f"config.json must name exactly one architecture, got {architectures!r}")
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {architecture!r} is not supported; modkit runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if missing := [key for key in required if key not in hf]:
            raise UnsupportedModelError(f"config.json lacks {', '.join(missing)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {hf['hidden_act']!r} is not supported (silu only)")
        if architecture == "Qwen2ForCausalLM" and hf.get("use_sliding_window", False):
            raise UnsupportedModelError("Qwen2 sliding-window attention is not supported")
        if hf.get("mlp_bias", False):
            raise UnsupportedModelError("mlp_bias is not supported")

        rope = dict(hf.get("rope_parameters") or {})
        legacy_scaling = hf.get("rope_scaling")
        if legacy_scaling:
            rope.update(legacy_scaling)
        rope_theta = float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        # Old configs say "type" where new ones say "rope_type".
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None
        if rope_type != "default":
            rope_scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "type")}
            rope_scaling["rope_type"] = rope_type

        num_heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // num_heads
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=architecture,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=num_heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2's config has no attention_bias key: its q/k/v projections always carry biases.
            attention_bias=architecture == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        """Read ``config.json`` from a checkpoint folder.

        End-of-sequence ids are the union of config.json's and generation_config.json's:
        chat models often list their end-of-turn token only in the latter.
        """
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir}")
        hf = json.loads(path.read_text())
        generation = Path(model_dir) / "generation_config.json"
        if generation.is_file():
            ids = [hf.get("eos_token_id"), json.loads(generation.read_text()).get("eos_token_id")]
            flat = [i for x in ids if x is not None for i in (x if isinstance(x, list) else [x])]
            hf = {**hf, "eos_token_id": list(dict.fromkeys(flat))}
        return cls.from_hf_dict(hf)
