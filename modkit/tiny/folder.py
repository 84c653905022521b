"""The Hugging Face folder: config.json, weights, tokenizer files, and the check on reload.

NOTE: ``config.json`` and ``tokenizer_config.json`` are written by hand, in the older form
both transformers 4.5x and 5.x read, instead of with ``save_pretrained``: transformers 5
writes a newer form that 4.5x cannot load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import safetensors.torch
import torch
import transformers
from tokenizers import Tokenizer
from transformers import Qwen2ForCausalLM

from modkit.tiny.chat import END_OF_TEXT, IM_END, IM_START
from modkit.tiny.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS

MAX_POSITION_EMBEDDINGS = 1024


def save_tokenizer(tok: Tokenizer, folder: Path) -> None:
    """tokenizer.json plus a tokenizer_config.json in the transformers 4.x form."""
    tok.save(str(folder / "tokenizer.json"))
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": END_OF_TEXT,
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    }
    special_map = {"eos_token": IM_END, "pad_token": END_OF_TEXT, "additional_special_tokens": [IM_START, IM_END]}
    write_json(folder / "tokenizer_config.json", config)
    write_json(folder / "special_tokens_map.json", special_map)


def model_config_dict(vocab_size: int) -> dict[str, Any]:
    """config.json for a 4-layer Qwen2, in the form transformers 4.5x and 5.x both read."""
    eot, im_end = SPECIAL_TOKENS.index(END_OF_TEXT), SPECIAL_TOKENS.index(IM_END)
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        # NOTE: 4.5x reads rope_theta at the top level; 5.x folds it into rope_parameters.
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 4,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": im_end,
        "pad_token_id": eot,
        "torch_dtype": "float32",
        "transformers_version": transformers.__version__,
    }


def padded_vocab_size(real_size: int, multiple: int = 64) -> int:
    """Round the embedding table up so its rows tile evenly (the spare rows are never used)."""
    return (real_size + multiple - 1) // multiple * multiple


def save_model(model: Qwen2ForCausalLM, folder: Path, vocab_size: int) -> None:
    """config.json, model.safetensors (float32, tied lm_head left out), generation_config."""
    # NOTE: lm_head.weight is the embedding matrix itself (tied), so it is not stored twice.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    safetensors.torch.save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model_config_dict(vocab_size)
    write_json(folder / "config.json", config)
    write_json(
        folder / "generation_config.json",
        {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
            "do_sample": False,
            "transformers_version": transformers.__version__,
        },
    )


def load_checked(folder: Path, trained: Qwen2ForCausalLM) -> Qwen2ForCausalLM:
    """Reload the folder; fail unless every key matched and the logits agree."""
    model, info = cast(
        tuple[Qwen2ForCausalLM, dict[str, Any]], Qwen2ForCausalLM.from_pretrained(folder, output_loading_info=True)
    )
    problems = {k: v for k, v in info.items() if v}  # missing, unexpected, mismatched keys
    if problems:
        raise RuntimeError(f"loading {folder} reported {problems}")
    model.eval()
    trained.eval()
    ids = torch.arange(3, 3 + 64)[None]  # (1, 64): arbitrary ordinary tokens
    with torch.no_grad():
        diff = (model(ids).logits - trained(ids).logits).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"reloaded logits differ from the trained model by {diff}")
    return model


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
