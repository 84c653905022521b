"""Find a checkpoint, build modkit's decoder for it, and load its weights.

A model is named by a local folder in Hugging Face format, or by a hub id such as
``Qwen/Qwen2.5-0.5B-Instruct`` (downloaded once into the Hugging Face cache, with a
progress bar), or by ``None`` for the tiny chat model that ships in ``data/models/tiny-chat``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from modkit.attention import DEFAULT_ATTENTION_BACKEND, get_attention_backend
from modkit.model.config import ModelConfig
from modkit.model.decoder import CausalLM
from modkit.model.parallel import TensorParallel, shard_slice

if TYPE_CHECKING:  # transformers loads in seconds: only load_tokenizer imports it
    from transformers import PreTrainedTokenizerBase

# The repository's data/ folder sits beside the package (editable installs and checkouts).
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parents[2] / "data" / "models" / "tiny-chat"
# The files a checkpoint needs; everything else in a hub repo (other formats, docs) is skipped.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local checkpoint folder nor obtainable from the hub."""


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the architecture its config.json describes."""


EMBEDDED_MODEL_NAME = "modkit/tiny-chat"  # the name the embedded model is served under (and may be asked by)


def embedded_model_dir() -> Path:
    """Folder of the embedded tiny chat model (``MODKIT_TINY_MODEL`` overrides it)."""
    return Path(os.environ.get("MODKIT_TINY_MODEL", EMBEDDED_MODEL_DIR))


def resolve_model_path(model: str | Path | None) -> Path:
    """Turn a model name into a local folder holding config.json and safetensors files.

    Order: ``None`` or ``"modkit/tiny-chat"`` -> the embedded model; an existing folder ->
    itself; otherwise a hub id, taken from the local Hugging Face cache if present, else
    downloaded.
    """
    if model is None or str(model) == EMBEDDED_MODEL_NAME:
        path = embedded_model_dir()
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"the embedded model is missing from {path}; run scripts/make_tiny_model.py "
                "or install modkit from a checkout of its repository (pip install -e .)"
            )
        return path
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but holds no config.json")
        return path
    name = str(model)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise ModelNotFoundError(f"{name!r} is not a folder, and not a hub id of the form 'org/name'")

    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=CHECKPOINT_FILES, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(name, allow_patterns=CHECKPOINT_FILES))
    except Exception as err:
        raise ModelNotFoundError(
            f"could not get {name!r}: it is not a local folder, not in the Hugging Face cache, "
            f"and downloading it failed ({type(err).__name__}: {err}). Offline? Download it on a "
            "machine with network (huggingface-cli download NAME) or pass a local folder."
        ) from err


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bfloat16', 'bf16', torch.bfloat16 ... -> torch.bfloat16."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU (bfloat16 there is emulated and slower); bf16 on GPUs that have it."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _read_checkpoint(model_dir: Path) -> dict[str, Any]:
    """Map every tensor name to the safetensors file that holds it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no .safetensors files in {model_dir}")
    where: dict[str, Any] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            where.update({name: file for name in f.keys()})  # noqa: SIM118  (safe_open has no __iter__)
    return where


def load_weights(model: CausalLM, model_dir: Path) -> None:
    """Copy every checkpoint tensor into the parameter of the same name, casting dtype.

    A tensor-parallel rank reads only its slice of each split tensor (``shard_slice``).
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = set(params)
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")  # shares model.embed_tokens.weight
    where = _read_checkpoint(model_dir)
    # Some exporters save the rotary table or a tied head; neither carries information.
    ignorable = {n for n in where if n.endswith("rotary_emb.inv_freq")}
    if model.config.tie_word_embeddings:
        ignorable.add("lm_head.weight")
    missing = sorted(expected - set(where))
    unexpected = sorted(set(where) - expected - ignorable)
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"checkpoint {model_dir} does not match {model.config.architecture}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(where[name], []).append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names:
                    stored = f.get_slice(name)
                    tensor = stored[shard_slice(name, tuple(stored.get_shape()), model.tp)]
                    if tensor.shape != params[name].shape:
                        raise CheckpointMismatchError(
                            f"{name}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(params[name].shape)}"
                        )
                    params[name].copy_(tensor)


def load_model(
    model: str | Path | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    attention_backend: str = DEFAULT_ATTENTION_BACKEND,
    tp: TensorParallel | None = None,
) -> CausalLM:
    """Build modkit's decoder for a checkpoint and load its weights, ready for inference.

    ``model``: local folder, hub id, or None for the embedded tiny model. ``dtype``: default
    float32 on CPU, bfloat16 on GPUs that support it, float16 on older GPUs. The q/k/v and
    gate/up weights are then joined for one matmul each (``fuse_projections``): on a GPU and on
    the CPU alike, each output column comes from the same dot product as before, so the logits
    are the same bits (``tests/test_fused_layers.py``), from fewer and larger matmuls.
    ``tp``: load only this tensor-parallel rank's slices (``modkit.model.parallel``).
    """
    model_dir = resolve_model_path(model)
    config = ModelConfig.from_pretrained(model_dir)
    dev = torch.device(device) if device is not None else default_device()
    torch_dtype = parse_dtype(dtype) if dtype is not None else default_dtype(dev)
    backend = get_attention_backend(attention_backend, dev)
    # Build on the meta device (no memory, no random init), then allocate for real.
    with torch.device("meta"):
        net = CausalLM(config, backend, tp)
    net.to_empty(device=dev)
    net.to(torch_dtype)
    net.tie_weights()  # to_empty gives each parameter its own storage, re-share the head
    net.model.rotary_emb.reset_inv_freq()  # rotation angles stay float32 in every dtype
    load_weights(net, model_dir)
    net.eval().requires_grad_(False)
    net.fuse_projections()  # once, after loading: the parameters become views of the joined weights
    return net


def load_tokenizer(model: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer (a transformers fast tokenizer, with its chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_path(model)))


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation in the model's chat template, ready for the reply."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))
