"""Tensor parallelism (``tensor_parallel_size``): two ranks on the CPU over gloo give the same greedy
outputs as one in float32, in-process and in the pipeline; each rank holds half of every split
weight and of the KV heads; sizes that cannot work are refused at once; no rank outlives its
worker, and a rank that dies makes the next step fail with ``RankDied``."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import torch
from waiting import pid_exists, wait_until

from modkit import LLM, Pipeline
from modkit.config import ConfigError, PipelineConfig
from modkit.frontend import EMBEDDED_MODEL_NAME
from modkit.model import encode_chat, load_model
from modkit.sampling_params import SamplingParams
from modkit.worker.tensor_parallel import RankDied

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
# The embedded model: 4 layers, 4 attention heads and 2 KV heads of 64, hidden 256, MLP 768.
SPLIT = {  # parameter of layer 0 -> its shape on each of 2 ranks
    "self_attn.q_proj.weight": [128, 256],
    "self_attn.q_proj.bias": [128],
    "self_attn.k_proj.weight": [64, 256],
    "self_attn.v_proj.weight": [64, 256],
    "self_attn.o_proj.weight": [256, 128],
    "mlp.gate_proj.weight": [384, 256],
    "mlp.up_proj.weight": [384, 256],
    "mlp.down_proj.weight": [256, 384],
}
# A long system prompt: chunked (32-token budget), and a prefix the second conversation finds cached.
SYSTEM = "You are a kind helper. You answer in short sentences about colors, animals, sums and capitals."
FIRST = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in ("Hello!", "What is 2 + 3?")]
THEN = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does a cow say?"}]]
CPU: dict[str, Any] = {"device": "cpu", "dtype": "float32"}  # gloo, on any machine (a GPU box too)
SETTINGS: dict[str, Any] = {**CPU, "num_kv_blocks": 64, "max_num_batched_tokens": 32, "max_model_len": 512}


def texts(llm: LLM, conversations: list[list[dict[str, str]]]) -> list[str]:
    return [o.outputs[0].text for o in llm.chat(conversations, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def one_rank() -> LLM:
    return LLM(**SETTINGS)


@pytest.fixture
def two_ranks() -> Iterator[LLM]:
    """One tensor-parallel engine at a time in a process (torch.distributed's default group): closed after each test."""
    llm = LLM(**SETTINGS, tensor_parallel_size=2)
    yield llm
    llm.close()


@pytest.mark.slow
def test_two_ranks_give_the_same_greedy_outputs_as_one_and_each_holds_half(one_rank: LLM, two_ranks: LLM) -> None:
    """Float32 on the CPU: the all-reduce adds partial sums in another order than one matmul,
    which moves logits in their last bits only; the argmax, and so every token, stays."""
    for llm in (one_rank, two_ranks):
        llm.check_invariants_each_step = True
    prompt = encode_chat(one_rank.get_tokenizer(), FIRST[0])
    assert len(prompt) > SETTINGS["max_num_batched_tokens"], "the prompt is computed in chunks"
    assert texts(two_ranks, FIRST) == texts(one_rank, FIRST)
    assert texts(two_ranks, THEN) == texts(one_rank, THEN)
    assert two_ranks.stats()["prefix_cache_hits"] > 0  # the system prompt's blocks, computed by both ranks
    assert two_ranks.stats()["prefix_cache_hits"] == one_rank.stats()["prefix_cache_hits"]
    assert two_ranks.engine.memory.num_blocks == one_rank.engine.memory.num_blocks == 64  # the same block ids
    check_what_each_rank_holds(one_rank, two_ranks)


def check_what_each_rank_holds(one_rank: LLM, two_ranks: LLM) -> None:
    """Half of each split weight and of the KV heads; the embeddings and norms whole."""
    ranks = two_ranks.engine.ranks
    assert ranks is not None
    held = ranks.held()
    assert [h["rank"] for h in held] == [0, 1] and held[1]["pid"] != os.getpid()
    full = dict(one_rank.engine.model.named_parameters())
    for h in held:
        for name, shape in SPLIT.items():
            assert h["weights"][f"model.layers.0.{name}"] == shape, name
        for name in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"):
            assert h["weights"][name] == list(full[name].shape)  # replicated
        assert h["kv_cache"] == [2, 64, 16, 1, 64]  # (K/V, blocks, block_size, 2 KV heads / 2 ranks, head_dim)
    assert list(one_rank.engine.worker.runner.kv_cache.layers[0].shape) == [2, 64, 16, 2, 64]
    # Rank 0's q_proj is the first half of the checkpoint's rows, its o_proj the first half of the columns.
    mine = dict(two_ranks.engine.model.named_parameters())
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(mine[q], full[q][:128]) and torch.equal(mine[o], full[o][:, :128])
    # Rank 1's slices are the other halves (loaded here as rank 1 would, with no group needed to load).
    from modkit.model.parallel import TensorParallel

    second = dict(load_model(None, tp=TensorParallel(1, 2)).named_parameters())
    assert torch.equal(second[q], full[q][128:]) and torch.equal(second[o], full[o][:, 128:])
    # Two all-reduces a layer a forward: after o_proj and after down_proj.
    layers = two_ranks.engine.model.config.num_hidden_layers
    assert ranks.num_steps > 0 and two_ranks.engine.model.tp.num_all_reduces == 2 * layers * ranks.num_steps


@pytest.mark.parametrize(
    ("size", "reason"),
    [(3, "num_attention_heads"), (4, "num_key_value_heads"), (0, "must be"), (True, "must be")],
)
def test_a_size_that_cannot_work_is_refused_naming_the_field(size: int, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as refused:
        LLM(tensor_parallel_size=size)
    assert refused.value.field == "tensor_parallel_size"


def test_the_pipeline_refuses_it_before_starting_anything() -> None:
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        PipelineConfig(tensor_parallel_size=0)
    assert PipelineConfig.from_cli(["--tensor-parallel-size", "2"]).to_engine_config().tensor_parallel_size == 2
    started = time.monotonic()
    with pytest.raises(ConfigError, match="num_attention_heads") as refused:
        Pipeline.launch(tensor_parallel_size=3, ports="auto", progress=False)
    assert refused.value.field == "tensor_parallel_size" and time.monotonic() - started < 10


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts the CUDA devices of a machine that has none")
def test_more_ranks_than_cuda_devices_is_refused() -> None:
    with pytest.raises(ConfigError, match="0 CUDA device") as refused:
        LLM(tensor_parallel_size=2, device="cuda:0")
    assert refused.value.field == "tensor_parallel_size"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between two CUDA devices")
def test_two_gpus_over_nccl_give_the_same_greedy_outputs_as_one() -> None:
    gpu: dict[str, Any] = {**SETTINGS, "device": "cuda:0"}
    expected = texts(LLM(**gpu), FIRST + THEN)
    llm = LLM(**gpu, tensor_parallel_size=2)
    try:
        assert llm.engine.ranks is not None
        assert [h["device"] for h in llm.engine.ranks.held()] == ["cuda:0", "cuda:1"]
        assert texts(llm, FIRST + THEN) == expected
    finally:
        llm.close()


@pytest.mark.slow
def test_a_dead_rank_fails_the_next_step_and_close_leaves_no_rank() -> None:
    llm = LLM(**CPU, num_kv_blocks=32, tensor_parallel_size=2)
    assert llm.engine.ranks is not None
    (rank_pid,) = llm.engine.ranks.pids
    assert texts(llm, FIRST[:1])
    os.kill(rank_pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(RankDied, match=rf"rank 1 \(pid {rank_pid}\) exited"):
        texts(llm, FIRST[:1])
    assert time.monotonic() - started < 10
    with pytest.raises(RuntimeError, match="default process group is already in use"):
        LLM(**CPU, num_kv_blocks=32, tensor_parallel_size=2)  # one tensor-parallel engine in a process at a time
    llm.close()
    llm.close()  # idempotent
    assert not pid_exists(rank_pid)

    llm = LLM(**CPU, num_kv_blocks=32, tensor_parallel_size=2)  # the default process group is free again
    assert llm.engine.ranks is not None
    pids = llm.engine.ranks.pids
    del llm  # collected: its ranks stop too
    assert wait_until(lambda: not any(pid_exists(p) for p in pids), 15), "a rank outlived its LLM"


@pytest.mark.slow
def test_a_pipeline_worker_of_two_ranks_matches_one_rank_and_takes_its_ranks_with_it(one_rank: LLM) -> None:
    """The same replies as one rank; a dead rank ends its worker (the supervisor starts it again, with
    new ranks); a killed worker, or a shut-down pipeline, leaves no rank behind."""
    p = Pipeline.launch(ports="auto", tensor_parallel_size=2, progress=False, **SETTINGS)
    try:
        health = p.health()["worker-0"]
        assert health["tensor_parallel_size"] == 2
        (rank_pid,) = health["tensor_parallel_pids"]
        client = p.client(timeout=60)

        def chat(messages: list[dict[str, str]]) -> str:
            reply = client.chat.completions.create(
                model=EMBEDDED_MODEL_NAME,
                messages=messages,  # type: ignore[arg-type]
                temperature=0,
                max_tokens=GREEDY.max_tokens,
                extra_body={"ignore_eos": True},
            )
            return reply.choices[0].message.content or ""

        served = [chat(c) for c in FIRST + THEN]
        assert served == texts(one_rank, FIRST) + texts(one_rank, THEN)
        assert p.stats()["kv_cache_manager"]["pools"][0]["prefix_cache_hits"] > 0

        worker_pid = p.pids()["worker-0"]
        os.kill(rank_pid, signal.SIGKILL)
        with pytest.raises(openai.InternalServerError):  # its step raised RankDied: the only worker is gone
            chat(THEN[0])

        def restarted() -> bool:
            health = p.health()["worker-0"]
            return health["http_status"] == 200 and health["pid"] != worker_pid

        assert wait_until(restarted, 60), "the supervisor did not start worker-0 again"
        (rank_pid,) = p.health()["worker-0"]["tensor_parallel_pids"]
        assert chat(THEN[0]) == served[-1]

        worker_pid = p.pids()["worker-0"]
        os.kill(worker_pid, signal.SIGKILL)  # the harshest end: its rank must still go
        assert wait_until(lambda: not pid_exists(rank_pid), 15), "rank 1 outlived its killed worker"
        assert wait_until(restarted, 60), "the supervisor did not start worker-0 again"
        (rank_pid,) = p.health()["worker-0"]["tensor_parallel_pids"]
    finally:
        p.shutdown()
    assert not pid_exists(rank_pid), "rank 1 outlived the pipeline"
