"""The fused path of the decoder (Triton kernels, joined q/k/v and gate/up matmuls) against the reference.

Each kernel of ``modkit.model.fused`` against its PyTorch reference in ``modkit.model.layers``,
over token counts from 1 to 1000+, sizes that are not powers of two, bf16, fp16 and float32;
then whole models with the fused path on and off. Those need a CUDA GPU and Triton and are
skipped, with the reason, elsewhere. The CPU tests check that the reference path is what the
CPU runs, and that joining the projections keeps every parameter's name and value.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.nn import functional as F

from modkit.attention.interface import metadata_from_lengths
from modkit.checks import compare_mixed_batch
from modkit.model import CausalLM, fused, load_model
from modkit.model.layers import apply_rotary, rms_norm_reference
from modkit.model.loader import load_weights

HAS_GPU = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="the fused kernels need a CUDA GPU and Triton")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (rtol, atol) for one kernel against its reference: two units in the last place of the dtype.
# The norms and silu round where their references do and differ only by float32 noise, which
# now and then moves a value across a rounding boundary: one ulp, or two where a second
# rounding follows (the norm's cast back before its weight multiply). In bf16/fp16 nearly
# every element is bit-equal (MIN_EXACT). rotary rounds once where the reference rounds three
# times, so a quarter to a third of its elements are one ulp off (see modkit.model.fused).
KERNEL_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
MIN_EXACT = 0.95
MIN_EXACT_ROTARY = 0.5
TOKENS = [1, 7, 1000, 1537]


def _run(model: CausalLM, device: str) -> list[torch.Tensor]:
    """Logits of two steps: three prompts (lengths 9, 1, 21), then one decode token each."""
    cfg = model.config
    block_size, num_blocks = 4, 32
    caches = [
        torch.zeros(
            2, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, dtype=model.lm_head.weight.dtype
        ).to(device)
        for _ in range(cfg.num_hidden_layers)
    ]
    tables = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]
    gen = torch.Generator().manual_seed(0)
    logits = []
    for lengths in ([(0, 9), (0, 1), (0, 21)], [(9, 1), (1, 1), (21, 1)]):
        metadata = metadata_from_lengths(lengths, tables, block_size, device)
        num_tokens = sum(new for _, new in lengths)
        ids = torch.randint(0, cfg.vocab_size, (num_tokens,), generator=gen).to(device)
        positions = torch.tensor([p for cached, new in lengths for p in range(cached, cached + new)]).to(device)
        with torch.inference_mode():
            logits.append(model(ids, positions, caches, metadata, torch.arange(num_tokens, device=device)))
    return logits


# ---------------------------------------------------------------------------------------------
# Everywhere: the CPU runs the reference path but for the joined matmuls, and joining the
# projections changes nothing.


@pytest.mark.parametrize("shape", ["qwen2", "qwen3", "llama3"])
def test_cpu_joins_projections_to_the_same_bits(random_checkpoint, shape: str) -> None:
    model = load_model(random_checkpoint(shape), device="cpu", dtype=torch.float32)
    assert not fused.available(torch.zeros(1))
    assert model.use_fused  # on by default: on the CPU that means the joined matmuls only
    assert model.model.layers[0].self_attn.qkv_weight is not None  # load_model joined them
    assert model.model.layers[0].mlp.gate_up_weight is not None
    on = _run(model, "cpu")
    model.use_fused = False  # one matmul per projection, as Hugging Face computes them
    assert not model.use_fused and not model.model.norm.use_fused
    off = _run(model, "cpu")
    for a, b in zip(on, off, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", ["qwen2", "qwen3", "llama3"])
def test_joined_projections_keep_names_and_values(random_checkpoint, shape: str) -> None:
    model = load_model(random_checkpoint(shape), device="cpu", dtype=torch.float32)
    model.use_fused = False  # load_model joined them: compare with one matmul per projection
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    state = {name: t.clone() for name, t in model.state_dict().items()}
    before = _run(model, "cpu")
    model.fuse_projections()  # again, on parameters that are views already
    model.use_fused = True
    assert [name for name, _ in model.named_parameters(remove_duplicate=False)] == names
    assert model.state_dict().keys() == state.keys()
    for name, t in model.state_dict().items():
        assert torch.equal(t, state[name]), name
    after = _run(model, "cpu")  # q/k/v and gate/up as one matmul each, on the CPU too
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # The parameters are views of the joined tensors: writing one (loading again) updates both.
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    assert attn.qkv_weight is not None and mlp.gate_up_weight is not None
    assert attn.k_proj.weight.data_ptr() == attn.qkv_weight[attn.q_proj.out_features :].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_up_weight[mlp.gate_proj.out_features :].data_ptr()
    with torch.no_grad():
        attn.v_proj.weight.zero_()
    assert attn.qkv_weight[-attn.v_proj.out_features :].abs().sum() == 0
    load_weights(model, random_checkpoint(shape))
    assert torch.equal(attn.v_proj.weight, state["model.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(attn.qkv_weight[-attn.v_proj.out_features :], attn.v_proj.weight)


# ---------------------------------------------------------------------------------------------
# On a GPU: each kernel against its reference.


def _close(got: torch.Tensor, want: torch.Tensor, min_exact: float = MIN_EXACT) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    rtol, atol = KERNEL_TOL[want.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)
    if want.dtype != torch.float32:
        exact = (got == want).float().mean().item()
        assert exact >= min_exact, f"only {exact:.2%} of the elements are bit-equal to the reference"


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("hidden", [896, 80, 128, 1000, 4096, 5120])
def test_rms_norm_and_add_rms_norm(dtype: torch.dtype, num_tokens: int, hidden: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(num_tokens * 10_000 + hidden)
    x = (3 * torch.randn(num_tokens, hidden, generator=gen, device="cuda")).to(dtype)
    residual = torch.randn(num_tokens, hidden, generator=gen, device="cuda").to(dtype)
    weight = (0.5 + torch.rand(hidden, generator=gen, device="cuda")).to(dtype)
    _close(fused.rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))

    normed, new_residual = fused.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(new_residual, x + residual)  # one rounding of the sum, as torch's add
    _close(normed, rms_norm_reference(x + residual, weight, 1e-5))


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(14, 2, 64), (16, 8, 128), (12, 4, 80)])
def test_rms_norm_over_heads_of_a_qkv_matmul(
    dtype: torch.dtype, num_tokens: int, heads: int, kv_heads: int, head_dim: int
) -> None:
    # Qwen3's q_norm and k_norm: each head its own row, read through the strides of a qkv view.
    gen = torch.Generator(device="cuda").manual_seed(num_tokens + head_dim)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen, device="cuda").to(dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    weight = (0.5 + torch.rand(head_dim, generator=gen, device="cuda")).to(dtype)
    for x in (q.view(num_tokens, heads, head_dim), k.view(num_tokens, kv_heads, head_dim)):
        _close(fused.rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("intermediate", [4864, 80, 1000, 8960, 11008])
def test_silu_and_mul(dtype: torch.dtype, num_tokens: int, intermediate: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(num_tokens + intermediate)
    gate_up = (4 * torch.randn(num_tokens, 2 * intermediate, generator=gen, device="cuda")).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    _close(fused.silu_and_mul(gate_up), F.silu(gate) * up)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(14, 2, 64), (32, 8, 128), (12, 4, 80), (5, 1, 96)])
@pytest.mark.parametrize("strided", [False, True])
def test_rotary(dtype: torch.dtype, num_tokens: int, heads: int, kv_heads: int, head_dim: int, strided: bool) -> None:
    gen = torch.Generator(device="cuda").manual_seed(num_tokens + heads + head_dim)
    if strided:  # views of one qkv matmul's output, as the fused attention passes them
        qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen, device="cuda").to(dtype)
        q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q, k = q.view(num_tokens, heads, head_dim), k.view(num_tokens, kv_heads, head_dim)
    else:
        q = torch.randn(num_tokens, heads, head_dim, generator=gen, device="cuda").to(dtype)
        k = torch.randn(num_tokens, kv_heads, head_dim, generator=gen, device="cuda").to(dtype)
    positions = torch.randint(0, 32_768, (num_tokens,), generator=gen, device="cuda")
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, device="cuda", dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q_before, k_before = q.clone(), k.clone()
    q_out, k_out = fused.rotary(q, k, cos, sin)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)  # out of place
    _close(q_out, apply_rotary(q, cos, sin), MIN_EXACT_ROTARY)
    _close(k_out, apply_rotary(k, cos, sin), MIN_EXACT_ROTARY)


# ---------------------------------------------------------------------------------------------
# On a GPU: whole models, fused on against fused off.

# Relative to the largest logit. bf16/fp16 differ by the odd last bit, carried through the layers.
MODEL_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["qwen2", "qwen2-untied", "qwen3", "llama3"])
def test_model_logits_fused_on_and_off(random_checkpoint, shape: str, dtype: torch.dtype) -> None:
    model = load_model(random_checkpoint(shape), device="cuda", dtype=dtype)
    attn = model.model.layers[0].self_attn
    assert model.use_fused and attn.qkv_weight is not None  # load_model joined the projections
    assert model.config.attention_bias == (attn.qkv_bias is not None)
    fused_logits = _run(model, "cuda")
    model.use_fused = False
    reference = _run(model, "cuda")
    for got, want in zip(fused_logits, reference, strict=True):
        err = (got - want).abs().max().item() / want.abs().max().item()
        assert err < MODEL_TOL[dtype], (shape, dtype, err)


@requires_gpu
@pytest.mark.parametrize("shape", ["qwen2", "qwen3"])
def test_fused_model_matches_hf_on_a_mixed_schedule(random_checkpoint, shape: str) -> None:
    stats = compare_mixed_batch(random_checkpoint(shape), device="cuda", attention_backend="triton")
    assert stats["mixed_steps"] >= 5
    assert stats["max_abs_diff"] < 1e-3 * max(1.0, stats["max_abs_logit"]), stats
