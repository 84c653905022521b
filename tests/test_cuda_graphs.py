"""CUDA graphs for decode steps, piecewise ones for steps with prompt chunks, and the KV cache
sized from measured GPU memory.

The graph tests need a CUDA GPU and Triton (the graph-safe attention backend) and are
skipped, with the reason, elsewhere; the ladder of batch sizes is checked everywhere.
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from modkit import LLM, SamplingParams
from modkit.engine.config import EngineConfig
from modkit.model import load_model
from modkit.worker import ModelRunner, PagedKVCache
from modkit.worker.cuda_graphs import DecodeInputs, capture_sizes, piecewise_capture_sizes
from modkit.worker.memory import plan_kv_cache
from modkit.worker.model_runner import SequenceChunk

gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="CUDA graphs need a CUDA GPU, and the graph-safe attention backend needs Triton",
)


def test_capture_sizes_cover_max_num_seqs() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 4]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 24]
    big = capture_sizes(256)
    assert big[:5] == [1, 2, 4, 8, 16] and big[-1] == 256 and len(big) == 35
    assert capture_sizes(300)[-2:] == [288, 320]
    assert capture_sizes(2000)[-1] == 2000  # past the ladder: one graph of exactly max_num_seqs


def test_piecewise_sizes_cover_the_token_budget() -> None:
    assert piecewise_capture_sizes(64) == [64]
    assert piecewise_capture_sizes(600) == [64, 128, 256, 512, 600]
    assert piecewise_capture_sizes(2048) == [64, 128, 256, 512, 1024, 2048]


def decode_chunks(rng: random.Random, n: int, block_size: int, num_blocks: int) -> list[SequenceChunk]:
    """n decodes with contexts of 1..300 tokens in scattered blocks."""
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    chunks = []
    for _ in range(n):
        context = rng.randrange(0, 300)
        table = [free.pop() for _ in range(context // block_size + 1)]
        chunks.append(SequenceChunk([rng.randrange(512)], context, table))
    return chunks


def test_decode_inputs_are_the_eager_inputs(random_checkpoint) -> None:
    """A decode graph's host inputs, written a column at a time, are what ``prepare`` computes
    for the eager forward; padding rows read and write the null block; a bad step is refused
    with the eager path's reason. On the CPU: this is host work only."""
    model = load_model(random_checkpoint("qwen2"), dtype="float32", device="cpu")
    runner = ModelRunner(model, PagedKVCache.allocate(model.config, 64, 16, torch.float32, "cpu"))
    rng = random.Random(0)
    inputs = DecodeInputs(runner, rows=16, width=8)
    for step in range(3):  # over the rows of the step before: tables of other lengths
        chunks = []
        for _ in range(11 - 3 * step):
            position = rng.randrange(7 * 16)
            table = rng.sample(range(1, 64), k=position // 16 + 1 + rng.randrange(2))
            chunks.append(SequenceChunk([rng.randrange(512)], position, table))
        n, pad = len(chunks), 16 - len(chunks)
        inputs.fill(chunks, 16)
        eager = runner.prepare(chunks)
        assert inputs.token_ids[:n].tolist() == eager.input_ids.tolist()
        assert inputs.positions[:n].tolist() == eager.positions.tolist()
        assert inputs.slot_mapping[:n].tolist() == eager.metadata.slot_mapping.tolist()
        assert inputs.seq_lens[:n].tolist() == eager.metadata.seq_lens.tolist()
        for row, chunk in enumerate(chunks):
            assert inputs.block_tables[row, : len(chunk.block_table)].tolist() == chunk.block_table
        assert inputs.token_ids[n:].tolist() == inputs.positions[n:].tolist() == [0] * pad
        assert inputs.slot_mapping[n:].tolist() == inputs.block_tables[n:, 0].tolist() == [0] * pad
        assert inputs.seq_lens[n:].tolist() == [1] * pad
    for bad, message in (
        (SequenceChunk([6], 3, [64]), "chunk 1 names a block outside 0..63"),
        (SequenceChunk([6], 40, [1, 2]), "chunk 1 needs 3 blocks for 41 tokens"),
        (SequenceChunk([6], -1, [1]), "chunk 1 has negative num_computed_tokens"),
    ):
        with pytest.raises(ValueError, match=message):
            inputs.fill([SequenceChunk([5], 20, [1, 2]), bad], 2)


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_replay_matches_the_eager_forward(random_checkpoint, dtype: str) -> None:
    """Batches between the ladder's sizes (padded), against the eager forward on a copy of the cache."""
    model = load_model(random_checkpoint("qwen2"), dtype=dtype, device="cuda", attention_backend="triton")
    cache = PagedKVCache.allocate(model.config, 1200, 16, model.lm_head.weight.dtype, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for layer in cache.layers:
        layer.copy_(torch.randn(layer.shape, generator=gen, device="cuda"))
    runner = ModelRunner(model, cache)
    graphs = runner.capture_cuda_graphs(max_num_seqs=40, max_model_len=512)
    assert graphs.sizes[-1] == 40
    rng = random.Random(0)
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    for n in (1, 3, 13, 40):
        chunks = decode_chunks(rng, n, 16, 1200)
        before = [layer.clone() for layer in cache.layers]
        replays = graphs.num_replays
        replayed = runner.execute(chunks)
        assert graphs.num_replays == replays + 1, "a decode step that fits a graph replays it"
        after_replay = [layer.clone() for layer in cache.layers]
        for layer, saved in zip(cache.layers, before, strict=True):
            layer.copy_(saved)
        eager = runner.forward(runner.prepare(chunks))
        assert replayed.shape == eager.shape == (n, model.config.vocab_size)
        error = ((replayed - eager).norm() / eager.norm()).item()
        assert error < tolerance, f"batch {n}: relative error {error}"
        # The new keys and values land in the same slots; the padding rows touch only the null block.
        for got, want in zip(after_replay, cache.layers, strict=True):
            assert torch.allclose(got[:, 1:].float(), want[:, 1:].float(), rtol=0, atol=tolerance)


def mixed_chunks(rng: random.Random, num_prompts: int, num_decodes: int, num_blocks: int) -> list[SequenceChunk]:
    """Decodes, then prompt chunks of 1..150 tokens after 0..100 cached ones (some stopping mid-prompt:
    no logits), in scattered blocks of 16."""
    chunks = decode_chunks(rng, num_decodes, 16, num_blocks)
    used = {b for c in chunks for b in c.block_table}
    free = [b for b in range(1, num_blocks) if b not in used]
    rng.shuffle(free)
    for _ in range(num_prompts):
        context, length = rng.randrange(0, 100), rng.randrange(1, 150)
        table = [free.pop() for _ in range((context + length) // 16 + 1)]
        logits = rng.choice([0, 1]) if length > 1 else 1
        chunks.append(SequenceChunk([rng.randrange(512) for _ in range(length)], context, table, logits))
    return chunks


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_piecewise_replay_matches_the_eager_forward(random_checkpoint, dtype: str) -> None:
    """Steps with prompt chunks (token counts between the ladder's sizes): the pieces' replays with
    attention between them give the eager forward's logits and cache writes; padding writes nothing."""
    model = load_model(random_checkpoint("qwen2"), dtype=dtype, device="cuda", attention_backend="triton")
    cache = PagedKVCache.allocate(model.config, 1500, 16, model.lm_head.weight.dtype, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for layer in cache.layers:
        layer.copy_(torch.randn(layer.shape, generator=gen, device="cuda"))
    runner = ModelRunner(model, cache)
    runner.capture_cuda_graphs(max_num_seqs=16, max_model_len=512, max_num_batched_tokens=600)
    piecewise = runner.piecewise
    assert piecewise is not None and piecewise.sizes == [64, 128, 256, 512, 600]
    assert len(piecewise.pieces[600]) == model.config.num_hidden_layers + 1
    rng = random.Random(3)
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    for num_prompts, num_decodes in ((1, 0), (2, 5), (3, 12), (1, 16)):
        chunks = mixed_chunks(rng, num_prompts, num_decodes, 1500)
        num_tokens = sum(len(c.token_ids) for c in chunks)
        assert num_tokens <= 600
        before = [layer.clone() for layer in cache.layers]
        replays = piecewise.num_replays
        replayed = runner.execute(chunks)
        assert piecewise.num_replays == replays + 1, f"{num_tokens} tokens: a step with a prompt chunk replays"
        after_replay = [layer.clone() for layer in cache.layers]
        for layer, saved in zip(cache.layers, before, strict=True):
            layer.copy_(saved)
        eager = runner.forward(runner.prepare(chunks))
        assert replayed.shape == eager.shape
        error = ((replayed - eager).norm() / eager.norm()).item()
        assert error < tolerance, f"{num_tokens} tokens: relative error {error}"
        for got, want in zip(after_replay, cache.layers, strict=True):  # the null block too: nothing padded lands
            assert torch.allclose(got.float(), want.float(), rtol=0, atol=tolerance)
    too_big = mixed_chunks(rng, 5, 0, 1500)
    too_big.append(SequenceChunk([rng.randrange(512) for _ in range(601)], 0, list(range(1400, 1440))))
    replays = piecewise.num_replays
    runner.execute(too_big)
    assert piecewise.num_replays == replays, "past the token budget the step runs eagerly"


@gpu
def test_a_bad_decode_step_is_refused_before_any_replay(random_checkpoint) -> None:
    """The graph path checks its inputs a column at a time, and names the chunk as the eager path does."""
    model = load_model(random_checkpoint("qwen2"), dtype="float32", device="cuda", attention_backend="triton")
    runner = ModelRunner(model, PagedKVCache.allocate(model.config, 64, 16, torch.float32, "cuda"))
    graphs = runner.capture_cuda_graphs(max_num_seqs=8, max_model_len=512)
    good = [SequenceChunk([5], 20, [1, 2]), SequenceChunk([6], 3, [3])]
    runner.execute(good)
    cases = [
        ([SequenceChunk([5], 20, [1, 2]), SequenceChunk([6], 3, [64])], "chunk 1 names a block outside 0..63"),
        ([SequenceChunk([5], 40, [1, 2]), SequenceChunk([6], 3, [3])], "chunk 0 needs 3 blocks for 41 tokens"),
        ([SequenceChunk([5], -1, [1]), SequenceChunk([6], 3, [3])], "chunk 0 has negative num_computed_tokens"),
        ([SequenceChunk([5], 1024, [1] * 65), SequenceChunk([6], 3, [3])], "past the model's limit"),
    ]
    for chunks, message in cases:
        replays = graphs.num_replays
        with pytest.raises(ValueError, match=message):
            runner.execute(chunks)
        assert graphs.num_replays == replays


@gpu
def test_prompt_chunks_and_big_batches_run_eagerly(random_checkpoint) -> None:
    model = load_model(random_checkpoint("qwen2"), dtype="bfloat16", device="cuda", attention_backend="triton")
    runner = ModelRunner(model, PagedKVCache.allocate(model.config, 200, 16, torch.bfloat16, "cuda"))
    graphs = runner.capture_cuda_graphs(max_num_seqs=4, max_model_len=256)
    rng = random.Random(1)
    assert not graphs.can_run(decode_chunks(rng, 5, 16, 200)), "more requests than the largest graph"
    assert not graphs.can_run([SequenceChunk([1, 2, 3], 0, [1])]), "a prompt chunk"
    assert not graphs.can_run([SequenceChunk([1], 5, [1], num_logits=0)])
    logits = runner.execute([SequenceChunk([1, 2, 3], 0, [1]), *decode_chunks(rng, 2, 16, 200)])
    assert logits.shape[0] == 3 and graphs.num_replays == 0


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_outputs_same_with_and_without_graphs(random_checkpoint, dtype: str) -> None:
    """The whole engine: prompts of many lengths, decoding in graphs with each step launched before the
    one before it is finished (decode tokens read on the device), equal in float32 to the eager engine
    stepped in turn (every token from the host)."""
    model = random_checkpoint("qwen2")
    rng = random.Random(2)
    prompts = [{"prompt_token_ids": [rng.randrange(512) for _ in range(rng.randrange(1, 90))]} for _ in range(24)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs, replays = {}, {}
    for eager in (True, False):
        llm = LLM(model, device="cuda", dtype=dtype, max_num_seqs=16, enforce_eager=eager, num_kv_blocks=400,
                  async_scheduling=not eager)  # fmt: skip
        assert llm.engine.model.attention_backend.name == "triton", "auto picks Triton on a GPU"
        outputs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        replays[eager] = llm.stats()["num_cuda_graph_replays"]
        assert (llm.stats()["num_steps_launched_ahead"] > 20) == (not eager)
        piecewise = llm.engine.worker.runner.piecewise
        assert (piecewise is not None and piecewise.num_replays > 0) == (not eager), "prompt steps replay in pieces"
    assert replays[True] == 0 and replays[False] > 20
    if dtype == "float32":
        assert outputs[False] == outputs[True]
    else:  # bf16 rounds a padded batch differently, and a random model's near-ties then diverge
        assert all(len(x) == 24 for x in outputs[False])
        same_first = sum(a[0] == b[0] for a, b in zip(outputs[False], outputs[True], strict=True))
        assert same_first >= 20, f"only {same_first} of 24 first tokens agree"


@gpu
def test_kv_cache_respects_gpu_memory_utilization(random_checkpoint) -> None:
    """Many requests' worth of blocks asked for: the budget, not the requests, sets the size."""
    model = load_model(random_checkpoint("qwen2"), dtype="bfloat16", device="cuda", attention_backend="triton")
    free, total = torch.cuda.mem_get_info()
    utilization = 0.05
    assert free > 2 * utilization * total, "this test needs most of the card free"
    cfg = EngineConfig(max_num_seqs=65536, gpu_memory_utilization=utilization, max_num_batched_tokens=4096)
    plan = plan_kv_cache(model, cfg, 1024, cuda_graphs=True)
    # The fullest step's logits (2048 rows, one per prompt that ends) alone take 4 bytes a vocabulary entry.
    assert plan.activation_peak_bytes > 4096 * model.config.vocab_size * 4 // 2
    assert plan.cuda_graph_bytes > 0
    used = plan.weights_bytes + plan.activation_peak_bytes + plan.cuda_graph_bytes + plan.kv_bytes
    assert utilization * total - plan.block_bytes <= used <= utilization * total
    assert "gpu_memory_utilization 0.05" in plan.describe(1024)
    with pytest.raises(Exception, match="gpu_memory_utilization"):
        plan_kv_cache(model, EngineConfig(gpu_memory_utilization=1e-6), 1024)
