"""The in-process engine end to end: scheduler + KV manager + worker + sampler on the tiny model.

Greedy outputs must equal transformers' ``generate`` whatever the engine does underneath:
chunked prompts, prefix-cache hits, preemption and recompute.
"""

from __future__ import annotations

import pytest
import torch

from modkit import LLM, SamplingParams
from modkit.checks import load_hf_model
from modkit.model import encode_chat, load_tokenizer

QUESTIONS = [
    "Hello!",
    "Hi",
    "Good morning!",
    "Who are you?",
    "What does a cow say?",
    "What does a dog say?",
    "What does a cat say?",
    "What is 2 plus 3?",
    "What is 4 plus 4?",
    "What is the capital of France?",
    "What is the capital of Japan?",
    "What color is the sky?",
    "What color is grass?",
    "Thank you!",
    "Tell me a story about a fox.",
    "What is the opposite of big?",
    "Goodbye!",
    "What day comes after Monday?",
]
SYSTEM = "You are a friendly assistant. You answer in short, simple sentences and you like animals."
MAX_TOKENS = 20


def conversations() -> list[list[dict[str, str]]]:
    """32 conversations of different lengths; half share a system prompt (a common prefix)."""
    convs = []
    for i in range(32):
        q = QUESTIONS[i % len(QUESTIONS)]
        conv = [{"role": "user", "content": q}]
        if i % 2:
            conv.insert(0, {"role": "system", "content": SYSTEM})
        if i % 5 == 0:
            conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, *conv]
        convs.append(conv)
    return convs


@pytest.fixture(scope="module")
def prompts(tiny_model_dir) -> list[list[int]]:
    tokenizer = load_tokenizer(tiny_model_dir)
    return [encode_chat(tokenizer, c) for c in conversations()]


@pytest.fixture(scope="module")
def hf_greedy(tiny_model_dir, prompts) -> list[list[int]]:
    model = load_hf_model(tiny_model_dir, torch.float32, "cpu")
    eos = list(
        model.generation_config.eos_token_id
        if isinstance(model.generation_config.eos_token_id, list)
        else [model.generation_config.eos_token_id]
    )
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0],
        )
        outs.append(out[0, len(p) :].tolist())
    return outs


def run(prompts: list[list[int]], **engine_args) -> tuple[LLM, list[list[int]]]:
    llm = LLM(**engine_args)
    llm.check_invariants_each_step = True
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False
    )
    assert all(o.finished for o in outs)
    return llm, [o.outputs[0].token_ids for o in outs]


def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert llm.engine.kv_manager.req_to_blocks == {}
    assert all(b.ref_cnt == 0 for b in llm.engine.kv_manager.pool.blocks[1:])
    llm.engine.check_invariants()


def test_every_prompt_chunked(prompts, hf_greedy) -> None:
    assert min(len(p) for p in prompts) > 8
    llm, outputs = run(prompts, max_num_batched_tokens=8, num_kv_blocks=512, enable_prefix_caching=False)
    assert outputs == hf_greedy
    records = llm.engine.scheduler.records
    # Each prompt is computed over several steps, and prompt chunks share steps with decodes.
    first_chunks = {}
    for record in records:
        for e in record.scheduled:
            first_chunks.setdefault(e.req_id, []).append(e) if e.kind == "prompt" else None
    assert all(len(chunks) >= 2 for chunks in first_chunks.values()) and len(first_chunks) == 32
    assert any({e.kind for e in r.scheduled} == {"prompt", "decode"} for r in records)
    assert all(r.tokens_used <= 8 for r in records)
    assert_all_blocks_free(llm)


def test_prefix_caching_hits_and_changes_nothing(prompts, hf_greedy) -> None:
    llm, outputs = run(prompts, num_kv_blocks=512, max_num_batched_tokens=64, block_size=4)
    assert outputs == hf_greedy
    stats = llm.stats()
    assert stats["prefix_cache_hits"] > 0
    assert stats["prefix_cache_hits"] < stats["prefix_cache_queries"]
    assert_all_blocks_free(llm)


def test_preemption_under_a_small_cache_changes_nothing(prompts, hf_greedy) -> None:
    llm, outputs = run(prompts, num_kv_blocks=24, block_size=4, max_num_batched_tokens=64)
    assert llm.stats()["num_preemptions"] > 0
    assert any(r.preempted for r in llm.engine.scheduler.records)
    assert outputs == hf_greedy
    assert_all_blocks_free(llm)


def test_priority_policy_changes_order_not_outputs(prompts, hf_greedy) -> None:
    llm = LLM(num_kv_blocks=24, block_size=4, max_num_batched_tokens=64, scheduling_policy="priority")
    llm.check_invariants_each_step = True
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    # The last four arrive last but are the most urgent: they are admitted first.
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts[:12]], params, use_tqdm=False, priority=[1] * 8 + [0] * 4
    )
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy[:12]
    first_step = llm.engine.scheduler.records[0]
    urgent = {o.request_id for o in outs[8:]}
    assert first_step.scheduled and {e.req_id for e in first_step.scheduled} <= urgent
    assert llm.stats()["num_preemptions"] > 0
    assert_all_blocks_free(llm)


def test_seeded_sampling_is_reproducible_whatever_the_batch(prompts) -> None:
    llm = LLM(num_kv_blocks=256)
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12)
    alone = llm.generate({"prompt_token_ids": prompts[3]}, seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": p} for p in prompts[:6]]
    mixed = llm.generate(
        [*others[:2], {"prompt_token_ids": prompts[3]}, *others[2:]],
        [SamplingParams(temperature=1.0, max_tokens=12)] * 2
        + [seeded]
        + [SamplingParams(temperature=0.7, top_k=5, max_tokens=12)] * 4,
        use_tqdm=False,
    )
    assert mixed[2].outputs[0].token_ids == alone


def test_stop_strings_token_ids_and_lengths(tiny_model_dir) -> None:
    llm = LLM(num_kv_blocks=64)
    msg = [{"role": "user", "content": "What does a cow say?"}]
    full = llm.chat(msg, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0].outputs[0]
    assert full.text == "A cow says moo." and full.finish_reason == "stop" and full.stop_reason is None
    cut = llm.chat(msg, SamplingParams(temperature=0, max_tokens=30, stop=["says m"]), use_tqdm=False)[0].outputs[0]
    assert cut.text == "A cow " and cut.finish_reason == "stop" and cut.stop_reason == "says m"
    kept = llm.chat(
        msg, SamplingParams(temperature=0, stop=["says m"], include_stop_str_in_output=True), use_tqdm=False
    )[0].outputs[0]
    assert kept.text == "A cow says m"
    token = full.token_ids[2]
    by_id = llm.chat(msg, SamplingParams(temperature=0, stop_token_ids=[token]), use_tqdm=False)[0].outputs[0]
    assert by_id.token_ids == full.token_ids[:3] and by_id.stop_reason == token
    short = llm.chat(msg, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0].outputs[0]
    assert short.token_ids == full.token_ids[:2] and short.finish_reason == "length"
    endless = llm.chat(msg, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    assert len(endless.outputs[0].token_ids) == 12 and endless.outputs[0].finish_reason == "length"
    assert_all_blocks_free(llm)


def test_outputs_are_shaped_like_vllms(tiny_model_dir) -> None:
    llm = LLM(num_kv_blocks=64)
    [out] = llm.generate(
        "Once upon a time", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, logprobs=2), use_tqdm=False
    )
    assert out.prompt == "Once upon a time" and out.prompt_token_ids and out.finished
    assert [c.index for c in out.outputs] == [0, 1, 2] and len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
        for token, entry in zip(c.token_ids, c.logprobs, strict=True):
            assert token in entry and len(entry) in (2, 3)
        assert c.cumulative_logprob == pytest.approx(
            sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs, strict=True))
        )
    m = out.metrics
    assert m.arrival_time <= m.first_token_time <= m.finished_time  # type: ignore[operator]


def test_bad_requests_are_refused_and_the_engine_keeps_serving(tiny_model_dir) -> None:
    llm = LLM(num_kv_blocks=64, max_model_len=64)
    with pytest.raises(ValueError, match="limit is 64"):
        llm.generate({"prompt_token_ids": [5] * 64}, SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match="vocab"):
        llm.generate({"prompt_token_ids": [10**6]}, SamplingParams(max_tokens=4), use_tqdm=False)
    # A bad prompt after good ones: the good ones of that call are dropped too, nothing stays queued.
    with pytest.raises(ValueError, match="vocab"):
        llm.generate([{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [-1]}], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    out = llm.chat([{"role": "user", "content": "Hello!"}], SamplingParams(temperature=0), use_tqdm=False)[0]
    assert out.outputs[0].text.startswith("Hello")
    assert_all_blocks_free(llm)


def test_max_model_len_caps_the_output(tiny_model_dir) -> None:
    llm = LLM(num_kv_blocks=64, max_model_len=24)
    out = llm.generate(
        {"prompt_token_ids": list(range(5, 25))}, SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"block_size": 0}, "block_size"),
        ({"max_num_seqs": -1}, "max_num_seqs"),
        ({"num_kv_blocks": 1}, "num_kv_blocks"),
        ({"max_model_len": 10**6}, "max_model_len"),
        ({"scheduling_policy": "nope"}, "scheduling policy"),
        ({"cudagraph_mode": "piecewise"}, "cudagraph_mode"),
        ({"async_scheduling": "yes"}, "async_scheduling"),
    ],
)
def test_bad_config_values_are_named(kwargs, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LLM(**kwargs)


def test_prompt_formats(tiny_model_dir) -> None:
    llm = LLM(num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=5)
    ids = llm.get_tokenizer().encode("The cat", add_special_tokens=False)
    one = llm.generate(ids, params, use_tqdm=False)
    assert len(one) == 1 and one[0].prompt_token_ids == ids and one[0].prompt is None
    by_text = llm.generate("The cat", params, use_tqdm=False)[0]
    as_dicts = llm.generate([{"prompt_token_ids": ids}, {"prompt": "The cat"}], params, use_tqdm=False)
    assert by_text.prompt_token_ids == ids
    assert {tuple(o.outputs[0].token_ids) for o in [*one, by_text, *as_dicts]} == {tuple(one[0].outputs[0].token_ids)}
    with pytest.raises(ValueError, match="sampling params for 2 prompts"):
        llm.generate(["a", "b"], [params], use_tqdm=False)


def test_kv_cache_is_sized_from_memory_by_default(tiny_model_dir) -> None:
    from modkit.worker import kv_cache_bytes_per_block
    from modkit.worker.memory import CPU_KV_CACHE_CAP_BYTES

    llm = LLM(max_num_seqs=4, max_model_len=256)
    blocks = llm.stats()["kv_blocks_total"]
    # Enough for every running request at full length, never more than the CPU cap.
    assert blocks == 4 * 256 // 16
    per_block = kv_cache_bytes_per_block(llm.engine.model_config, 16, torch.float32)
    assert (blocks + 1) * per_block <= CPU_KV_CACHE_CAP_BYTES


@pytest.mark.parametrize("num_kv_blocks", [None, 14], ids=["roomy", "preempting"])
def test_overlapped_and_async_steps_change_nothing(tiny_model_dir, num_kv_blocks) -> None:
    """LLM.steps() plans step N+1 (and on a GPU launches it) and detokenizes step N-1 while step N
    runs: same outputs as the plain loop, stop strings included (a request a stop string ends
    computes a token or two more, which are dropped), with penalties (the worker fills in tokens
    the scheduler has not seen; a step whose sampling reads them is not launched ahead) and with
    preemptions of requests whose tokens are in flight. Launching ahead, decode tokens are read
    on the device from the step before; here the CPU is told to do what a GPU does."""
    msg = [{"role": "user", "content": "What does a cow say?"}]  # "A cow says moo."
    params = [
        SamplingParams(temperature=0, max_tokens=30, stop=["says m"]),
        SamplingParams(temperature=0, max_tokens=7),
        SamplingParams(temperature=0.9, seed=3, max_tokens=25, n=2),
        SamplingParams(temperature=0, max_tokens=20, stop=[" "], include_stop_str_in_output=True),
        SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.6, frequency_penalty=0.5, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=1),
    ]
    results = {}
    for mode in ("plain", "overlap", "async", "launch-ahead"):
        llm = LLM(max_num_seqs=4, max_num_batched_tokens=24, block_size=4, num_kv_blocks=num_kv_blocks,
                  enable_prefix_caching=False, async_scheduling=mode in ("async", "launch-ahead"))  # fmt: skip
        llm.overlap_steps = mode != "plain"
        llm.engine.launch_ahead = mode == "launch-ahead"
        llm.check_invariants_each_step = True
        outs = llm.chat([msg] * len(params), params, use_tqdm=False)
        results[mode] = [(c.text, c.token_ids, c.finish_reason, c.stop_reason) for o in outs for c in o.outputs]
        stats = llm.stats()
        assert not llm.engine.has_unfinished_requests() and stats["kv_blocks_free"] == stats["kv_blocks_total"]
        assert (stats["num_steps_planned_ahead"] > 0) == (mode in ("async", "launch-ahead"))
        launched = stats["num_steps_launched_ahead"]
        if mode == "launch-ahead":  # not while the penalised request runs
            assert 0 < launched < stats["num_steps_planned_ahead"]
        else:
            assert launched == 0
        assert not llm.engine.worker.placeholders, "every token read on the device reached the host too"
        if num_kv_blocks is not None and mode != "plain" and mode != "overlap":  # it takes blocks a step early
            assert stats["num_preemptions"] > 0
    assert results["overlap"] == results["plain"]
    assert results["async"] == results["plain"]
    assert results["launch-ahead"] == results["plain"]
    assert any(r[2] == "stop" and r[3] == "says m" for r in results["async"]), "a stop string ended one"
    assert [(len(r[1]), r[2]) for r in results["async"][-2:]] == [(24, "length"), (1, "length")]


def test_memory_plan_is_reported(tiny_model_dir) -> None:
    llm = LLM(max_num_seqs=4, max_model_len=256)
    plan = llm.engine.memory
    assert plan.kv_capacity_tokens == (plan.num_blocks - 1) * 16 == llm.stats()["kv_capacity_tokens"]
    text = plan.describe(256)
    assert text.startswith(f"KV cache: {plan.kv_capacity_tokens:,} tokens") and "4.0x concurrency at 256" in text
    assert LLM(num_kv_blocks=40).engine.memory.describe(64).startswith("KV cache: 624 tokens (39 blocks of 16")


def test_leaving_steps_early_loses_no_token(tiny_model_dir) -> None:
    """LLM.steps() holds one step's outputs back and has the next in flight; a caller that stops
    iterating still gets both, and the engine is left ready for the next call."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["Once upon a time", "The cat"]
    whole = [o.outputs[0].token_ids for o in LLM(max_num_seqs=2).generate(prompts, params, use_tqdm=False)]
    llm = LLM(max_num_seqs=2)
    outputs = [llm._add(p, params, 0, []) for p in prompts]
    for _, _ in zip(range(3), llm.steps(), strict=False):
        pass  # closed after three yields: a fourth step's outputs held back, a fifth step in flight
    assert [len(o.outputs[0].token_ids) for o in outputs] == [5, 5], "held-back and in-flight steps processed"
    llm.engine.check_invariants()
    for _ in llm.steps():
        pass
    assert [o.outputs[0].token_ids for o in outputs] == whole


def test_steps_freeze_the_startup_heap_and_give_it_back(tiny_model_dir) -> None:
    """Full collections skip what existed before the run (modkit.heap); after it nothing stays frozen,
    so a deleted engine is collected as before."""
    import gc
    import weakref

    llm = LLM(max_num_seqs=2)
    params = SamplingParams(temperature=0, max_tokens=4)
    llm._add("Once upon a time", params, 0, [])
    frozen_during = [gc.get_freeze_count() for _ in llm.steps()]
    assert frozen_during and min(frozen_during) > 100_000, "the model, tokenizer and blocks are frozen"
    assert gc.get_freeze_count() == 0
    model = weakref.ref(llm.engine.model)
    del llm
    gc.collect()
    assert model() is None, "nothing of the engine is kept alive"


def test_a_loop_left_open_at_exit_closes_cleanly(tmp_path) -> None:
    """A script that stops reading ``LLM.steps()`` and exits: the loop is closed at exit, its steps
    in flight finished, while the interpreter still works (teardown would find modules gone and
    print a traceback, then abort in torch)."""
    import subprocess
    import sys

    script = tmp_path / "left_open.py"
    script.write_text(
        "import atexit\n"
        "atexit.register(lambda: print('tokens at exit', len(out.outputs[0].token_ids)))  # runs last\n"
        "from modkit import LLM, SamplingParams\n"
        "llm = LLM(max_num_seqs=1)\n"
        "out = llm._add('Once upon a time', SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), 0, [])\n"
        "loop = llm.steps()\n"
        "next(loop)\n"
        "print('tokens read', len(out.outputs[0].token_ids))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr[-2000:]
    assert "tokens read 1" in done.stdout
    assert "tokens at exit 3" in done.stdout, "the held-back and in-flight steps were processed at exit"
