"""Checkpoint loading: folders, shards, configs of both transformers eras, and clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modkit.attention import (
    AttentionBackend,
    attention_backends,
    get_attention_backend,
    register_attention_backend,
)
from modkit.attention.torch_ref import TorchReferenceAttention
from modkit.checks import compare_mixed_batch, load_hf_model
from modkit.model import (
    CheckpointMismatchError,
    ModelConfig,
    ModelNotFoundError,
    UnsupportedModelError,
    default_dtype,
    load_model,
    load_tokenizer,
    parse_dtype,
)
from modkit.model.layers import rope_inv_freq


def test_a_random_checkpoints_tokenizer_has_a_word_for_every_id(random_checkpoint) -> None:
    """What a random model samples becomes text, as a real model's tokens do (benchmarks detokenize it)."""
    from modkit import LLM, SamplingParams

    path = random_checkpoint("qwen2")
    tokenizer = load_tokenizer(path)
    vocab_size = ModelConfig.from_pretrained(path).vocab_size
    assert all(tokenizer.decode([i]).strip() for i in range(vocab_size))
    out = LLM(path, max_num_seqs=2).generate([[1, 2, 3]], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    completion = out[0].outputs[0]
    assert len(completion.text) >= 8 and completion.text == tokenizer.decode(completion.token_ids)


def test_sharded_checkpoint_loads_and_matches_hf(random_checkpoint, tmp_path: Path) -> None:
    hf = load_hf_model(random_checkpoint("llama3"), torch.float32, "cpu")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    assert compare_mixed_batch(tmp_path, hf_model=hf)["max_abs_diff"] < 1e-4


def test_tied_and_untied_heads(random_checkpoint) -> None:
    tied = load_model(random_checkpoint("qwen2"))
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    untied = load_model(random_checkpoint("qwen2-untied"))
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_missing_tensor_is_named(random_checkpoint, tmp_path: Path) -> None:
    source = random_checkpoint("qwen3")
    shutil.copy(source / "config.json", tmp_path / "config.json")
    tensors = load_file(str(source / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"missing \['model.layers.1.self_attn.k_norm.weight'\]"):
        load_model(tmp_path)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_model(tmp_path)


def test_config_reads_both_transformers_eras(random_checkpoint) -> None:
    new_form = json.loads((random_checkpoint("llama3") / "config.json").read_text())
    assert "rope_parameters" in new_form
    old_form = {k: v for k, v in new_form.items() if k != "rope_parameters"}
    old_form["rope_theta"] = new_form["rope_parameters"]["rope_theta"]
    old_form["rope_scaling"] = {k: v for k, v in new_form["rope_parameters"].items() if k != "rope_theta"}
    old_form["rope_scaling"]["type"] = old_form["rope_scaling"].pop("rope_type")
    assert ModelConfig.from_hf_dict(old_form) == ModelConfig.from_hf_dict(new_form)


def test_llama3_rope_scaling_changes_low_frequencies(random_checkpoint) -> None:
    config = ModelConfig.from_pretrained(random_checkpoint("llama3"))
    plain = ModelConfig.from_hf_dict(
        {
            **json.loads((random_checkpoint("llama3") / "config.json").read_text()),
            "rope_parameters": {"rope_theta": config.rope_theta},
        }
    )
    scaled, unscaled = rope_inv_freq(config), rope_inv_freq(plain)
    wavelen = 2 * torch.pi / unscaled
    short, long = wavelen < 64 / 4, wavelen > 64 / 1  # original context 64, high/low factors 4 and 1
    assert short.sum() >= 1 and long.sum() >= 1
    assert torch.equal(scaled[short], unscaled[short])  # high frequencies kept
    torch.testing.assert_close(scaled[long], unscaled[long] / 8)  # low ones divided by the factor


def test_unknown_rope_type_is_refused(random_checkpoint) -> None:
    hf = json.loads((random_checkpoint("qwen2") / "config.json").read_text())
    hf["rope_parameters"] = {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_hf_dict(hf)


def test_dtypes() -> None:
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert parse_dtype("bf16") == torch.bfloat16 and parse_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="float8"):
        parse_dtype("float8")


def test_model_loads_in_the_dtype_asked_for(random_checkpoint) -> None:
    model = load_model(random_checkpoint("qwen2"), dtype="float16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_not_a_folder_nor_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not a folder"):
        load_model(str(tmp_path / "nothing-here"))


def test_hub_id_offline_and_not_cached_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = "from modkit.model import resolve_model_path; resolve_model_path('modkit-test/no-such-model')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "ModelNotFoundError" in done.stderr and "modkit-test/no-such-model" in done.stderr
    assert "Offline?" in done.stderr


def test_a_registered_backend_is_used_by_the_model(random_checkpoint) -> None:
    calls = []

    @register_attention_backend("counting_test_backend")
    class Counting(AttentionBackend):
        def forward(self, query, key, value, kv_cache, metadata, scale):  # type: ignore[no-untyped-def]
            calls.append(metadata.num_tokens)
            return TorchReferenceAttention().forward(query, key, value, kv_cache, metadata, scale)

    assert "counting_test_backend" in attention_backends()
    model = load_model(random_checkpoint("qwen2"), attention_backend="counting_test_backend")
    reference = load_model(random_checkpoint("qwen2"))
    from modkit.worker import ModelRunner, PagedKVCache, SequenceChunk

    logits = []
    for m in (model, reference):
        runner = ModelRunner(m, PagedKVCache.allocate(m.config, 4, 4, torch.float32, "cpu"))
        logits.append(runner.execute([SequenceChunk([1, 2, 3], 0, [2])]))
    assert calls == [3, 3]  # once per layer, 3 tokens each
    torch.testing.assert_close(logits[0], logits[1])
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        get_attention_backend("nope")


def test_eos_ids_come_from_config_and_generation_config(random_checkpoint, tmp_path: Path) -> None:
    source = random_checkpoint("qwen2")
    hf = json.loads((source / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "eos_token_id": 7}))
    assert ModelConfig.from_pretrained(tmp_path).eos_token_ids == (7,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 7]}))
    assert ModelConfig.from_pretrained(tmp_path).eos_token_ids == (7, 9)
