#!/usr/bin/env python
"""Offline throughput: modkit's LLM against HF generate (static batches and continuous batching) and vLLM's LLM.

    python scripts/benchmark.py                                   # embedded model, CPU
    python scripts/benchmark.py --model-shape qwen2.5-0.5b --device cuda --num-prompts 1024 \\
        --input-len 256 --output-len 128                          # a GPU
    python scripts/benchmark.py --engines modkit pipeline         # the cost of the process split
    python scripts/benchmark.py --engines modkit hf hf-batch      # HF's own continuous batching
    python scripts/benchmark.py --engines modkit modkit-eager     # what the CUDA graphs buy (a GPU)
    python scripts/benchmark.py --engines pipeline pipeline-sync  # what async scheduling buys
    python scripts/benchmark.py --engines modkit modkit-planned-ahead  # what launching step N+1 early buys
    python scripts/benchmark.py --engines modkit modkit-decode-graphs  # what piecewise graphs buy

``hf`` is ``model.generate`` on static batches (--hf-batch-size prompts at a time, with no
padding as every prompt has one length): the baseline of the ``vs hf`` column. ``hf-batch`` is
transformers' continuous batching, ``model.generate_batch`` over its paged KV cache with
"paged|sdpa" attention, given the same --max-num-seqs and --max-num-batched-tokens as modkit.

The ``pipeline`` engine is the six-process pipeline behind its OpenAI API: launched once
(its launch is timed apart), then every prompt sent at once as token ids, one request
each; output tokens are counted from each response's ``usage``. Its outputs are checked
against modkit's LLM, and ``vs modkit`` is the cost of splitting the engine into processes.

Every engine gets the same prompts (random token ids of one length, so HF needs no
padding), greedy decoding and ``ignore_eos`` (``hf-batch``: no eos token), so each produces
exactly num_prompts x output_len tokens. Each warms up on --warmup-prompts prompts (default a
full batch: a smaller one leaves the first timed run paying for allocator growth and CUDA
graphs of larger sizes), then runs the whole workload --repeats times; the median is
reported. A table is printed last; the full results go to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import gc
import importlib.metadata
import itertools
import json
import logging
import math
import multiprocessing
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from modkit.checks import RANDOM_MODEL_SHAPES, load_hf_model, make_random_checkpoint
from modkit.model import embedded_model_dir


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


Run = Callable[[], dict[str, Any] | None]
"""One run of the whole workload. It may return what it measured beyond wall time: ``output_tokens``
(default num_prompts x output_len), ``texts`` (compared across engines), and numbers (their median is kept)."""


def bench_modkit(
    model_dir: Path,
    prompts: list[list[int]],
    args: argparse.Namespace,
    stack: ExitStack,
    eager: bool = False,
    async_scheduling: bool = True,
    cudagraph_mode: str = "full_and_piecewise",
    launch_ahead: bool = True,
) -> Run:
    from modkit import LLM, SamplingParams

    llm = LLM(
        model_dir,
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_kv_blocks=args.num_kv_blocks,
        attention_backend=args.attention_backend,
        enforce_eager=eager or args.enforce_eager,
        async_scheduling=async_scheduling,
        cudagraph_mode=cudagraph_mode,
    )
    llm.engine.launch_ahead = llm.engine.launch_ahead and launch_ahead
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)

    def run(ps: list[list[int]]) -> dict[str, Any]:
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
        return {"texts": [o.outputs[0].text for o in outs]}

    run(prompts[: args.warmup_prompts])  # warm-up
    return lambda: run(prompts)


def bench_hf(model_dir: Path, prompts: list[list[int]], args: argparse.Namespace, stack: ExitStack) -> Run:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = load_hf_model(model_dir, dtype, args.device)
    batch = args.hf_batch_size or len(prompts)

    def run(ps: list[list[int]]) -> None:
        for i in range(0, len(ps), batch):
            ids = torch.tensor(ps[i : i + batch], device=args.device)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=args.output_len,
                min_new_tokens=args.output_len,
                pad_token_id=0,
            )
            assert out.shape[1] == ids.shape[1] + args.output_len

    run(prompts[: args.warmup_prompts])  # warm-up
    return lambda: run(prompts)


def bench_hf_batch(model_dir: Path, prompts: list[list[int]], args: argparse.Namespace, stack: ExitStack) -> Run:
    """Transformers' continuous batching: ``generate_batch`` on one manager, kept from the warm-up to the last run."""
    from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig, GenerationMixin

    if not hasattr(GenerationMixin, "generate_batch"):
        raise ImportError(f"transformers {importlib.metadata.version('transformers')} has no generate_batch")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    # NOTE: transformers 5.17 needs "paged|sdpa" for SDPA over the paged cache; later versions take it
    # as plain "sdpa" (with a FutureWarning) and would switch to flash attention where it is installed,
    # unless auto_switch_to_flash is off.
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="paged|sdpa")
    model = model.to(args.device).eval()
    # eos_token_id=-1 disables stopping at an eos token (there is no ignore_eos), so each request
    # runs to max_new_tokens; None would fall back to the model's own eos.
    generation_config = GenerationConfig(max_new_tokens=args.output_len, do_sample=False, eos_token_id=-1)
    engine: dict[str, Any] = {
        "max_requests_per_batch": args.max_num_seqs,
        "max_batch_tokens": args.max_num_batched_tokens,
    }
    if "auto_switch_to_flash" in {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}:
        engine["auto_switch_to_flash"] = False
    if args.device == "cpu":  # else the cache takes 90% of the free RAM: pages of 256 tokens, enough for a full batch
        per_request = math.ceil((args.input_len + args.output_len) / 256) + 1
        engine["num_blocks"] = min(len(prompts), args.max_num_seqs) * per_request
    cb_config = ContinuousBatchingConfig(**engine)
    # A persistent manager keeps its KV cache and captured graphs from one call to the next; the
    # manager's warning that it says so on every call is all its logger would print.
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    stack.callback(model.destroy_cached_continuous_batching_manager)

    def run(ps: list[list[int]]) -> None:
        outs = model.generate_batch(
            inputs=ps,
            generation_config=generation_config,
            continuous_batching_config=cb_config,
            persistent_manager=True,
        )
        assert len(outs) == len(ps), f"{len(outs)} of {len(ps)} requests came back"  # it logs a failed one and goes on
        assert all(len(o.generated_tokens) == args.output_len for o in outs.values())

    run(prompts[: args.warmup_prompts])  # warm-up
    return lambda: run(prompts)


def bench_vllm(model_dir: Path, prompts: list[list[int]], args: argparse.Namespace, stack: ExitStack) -> Run:
    import vllm

    llm = vllm.LLM(
        model=str(model_dir),
        dtype=args.dtype,
        enforce_eager=args.device == "cpu",
        seed=0,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    params = vllm.SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)

    def run(ps: list[list[int]]) -> None:
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)  # type: ignore[arg-type]
        assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)

    run(prompts[: args.warmup_prompts])  # warm-up
    return lambda: run(prompts)


def warm_client(_: int) -> None:
    """Import the client in a client process before anything is timed."""
    import openai  # noqa: F401


def send_completions(
    url: str, model: str, output_len: int, stream: bool, prompts: list[list[int]]
) -> list[tuple[str, int, float]]:
    """Send every prompt at once to the pipeline's OpenAI API (in a client process); for each, the
    completion's text, its usage.completion_tokens and seconds to its first token (streamed only)."""
    import openai

    body = {"model": model, "max_tokens": output_len, "temperature": 0}

    async def one(client: openai.AsyncOpenAI, prompt: list[int]) -> tuple[str, int, float]:
        sent = time.perf_counter()
        if not stream:
            done = await client.completions.create(prompt=prompt, extra_body={"ignore_eos": True}, **body)
            assert done.usage is not None
            return done.choices[0].text, done.usage.completion_tokens, 0.0
        text: list[str] = []
        tokens, ttft = 0, 0.0
        chunks = await client.completions.create(
            prompt=prompt, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **body
        )
        async for chunk in chunks:
            if chunk.choices:  # one per step; its text may be "" (a character's first bytes)
                if not text:
                    ttft = time.perf_counter() - sent
                text.append(chunk.choices[0].text)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return "".join(text), tokens, ttft

    async def send() -> list[tuple[str, int, float]]:
        # A client per call, as an AsyncOpenAI belongs to the event loop it first ran in. Its pool of
        # 1,000 connections is plenty: the scheduler queues all but max_num_seqs requests anyway.
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="modkit", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    return asyncio.run(send())


def bench_pipeline(
    model_dir: Path, prompts: list[list[int]], args: argparse.Namespace, stack: ExitStack, async_scheduling: bool = True
) -> Run:
    """The six-process pipeline on free ports, up until ``stack`` closes; every prompt is sent at once."""

    from modkit import Pipeline
    from modkit.config import free_component_ports

    config: dict[str, Any] = free_component_ports()
    start = time.perf_counter()
    pipeline = Pipeline.launch(
        model=str(model_dir),
        device=args.device,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        async_scheduling=async_scheduling,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_kv_blocks=args.num_kv_blocks,
        num_workers=args.num_workers,
        progress=False,
        record=args.record,
        **config,
    )
    stack.enter_context(pipeline)
    launch_s = time.perf_counter() - start
    # The client is a load generator of its own: one Python process spends a few milliseconds of CPU
    # per request in the openai client, so 1,024 requests would reach the frontend over seconds.
    # --client-procs processes each send a contiguous share of the prompts.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(args.client_procs, mp_context=context)
    stack.callback(pool.shutdown)
    list(pool.map(warm_client, range(args.client_procs)))  # started and warm before timing
    send = functools.partial(send_completions, pipeline.url, pipeline.model_name, args.output_len, args.stream)

    def send_all(ps: list[list[int]]) -> list[tuple[str, int, float]]:
        bounds = [len(ps) * i // args.client_procs for i in range(args.client_procs + 1)]
        shares = [ps[a:b] for a, b in itertools.pairwise(bounds)]
        return [reply for replies in pool.map(send, shares) for reply in replies]

    def step_totals() -> dict[str, float]:
        """The scheduler's running totals over every worker: where each step's time went."""
        workers = pipeline.stats()["scheduler"]["workers"]
        return {
            "steps": sum(w["num_steps"] for w in workers),
            "worker": sum(w["step_time_s_mean"] * w["num_steps"] for w in workers),  # plan sent -> result back
            "forward": sum(w["forward_s_total"] for w in workers),
            "sample": sum(w["sample_s_total"] for w in workers),
            "schedule": sum(w["schedule_s_total"] for w in workers),
            "update": sum(w["update_s_total"] for w in workers),
            "kv_round_trips": sum(w["kv_round_trips"] for w in workers),
            "kv_wait": sum(w["kv_round_trip_s_total"] for w in workers),
            "kv_manager": sum(w["kv_manager_s_total"] for w in workers),
        }

    def loop_clocks() -> dict[str, dict[str, float]]:
        """Each component's serve-loop clock (``LoopClock``): seconds busy and elapsed so far."""
        return {name: s["loop"] for name, s in pipeline.stats().items() if isinstance(s.get("loop"), dict)}

    def run(ps: list[list[int]]) -> dict[str, Any]:
        before, clocks, start = step_totals(), loop_clocks(), time.perf_counter()
        texts, tokens, ttfts = zip(*send_all(ps), strict=True)
        wall, after = time.perf_counter() - start, step_totals()
        busy = {  # share of the run each process's loop was busy: near 1, the one the others wait for
            name: (c["busy_s"] - clocks[name]["busy_s"]) / (c["elapsed_s"] - clocks[name]["elapsed_s"])
            for name, c in loop_clocks().items()
            if name in clocks
        }
        assert all(n == args.output_len for n in tokens), tokens
        ttft = {"mean_ttft_s": statistics.mean(ttfts)} if args.stream else {}
        steps = after["steps"] - before["steps"]
        per_step = {  # milliseconds per step (round trips: count per step)
            f"{k}_ms" if k != "kv_round_trips" else k: (after[k] - before[k])
            / steps
            * (1 if k == "kv_round_trips" else 1e3)
            for k in ("worker", "forward", "sample", "schedule", "update", "kv_round_trips", "kv_wait", "kv_manager")
        }
        return {
            "texts": list(texts),
            "output_tokens": sum(tokens),
            "launch_s": launch_s,
            "steps": steps,
            "wall_ms": 1e3 * wall / steps,
            **per_step,
            "loop_busy": busy,
            **ttft,
        }

    run(prompts[: args.warmup_prompts])  # warm-up
    if args.save_trace and args.record:  # the timed runs' trace, saved when the pipeline stops
        pipeline.clear_trace()
        stack.callback(lambda: print(f"saved {pipeline.trace().save(args.save_trace)}"))
    return lambda: run(prompts)


# Each loads its engine and warms it up; what must be stopped once its runs are done goes on the ExitStack.
RUNNERS: dict[str, Callable[[Path, list[list[int]], argparse.Namespace, ExitStack], Run]] = {
    "modkit": bench_modkit,
    "modkit-eager": functools.partial(bench_modkit, eager=True),  # no CUDA graphs: what they buy
    "modkit-sync": functools.partial(bench_modkit, async_scheduling=False),  # what async scheduling buys
    "modkit-planned-ahead": functools.partial(bench_modkit, launch_ahead=False),  # what launching ahead buys
    "modkit-decode-graphs": functools.partial(bench_modkit, cudagraph_mode="full_decode_only"),  # piecewise's worth
    "hf": bench_hf,
    "hf-batch": bench_hf_batch,
    "vllm": bench_vllm,
    "pipeline": bench_pipeline,
    "pipeline-sync": functools.partial(bench_pipeline, async_scheduling=False),
}


def timed(run: Run, repeats: int, device: str) -> tuple[list[float], list[dict[str, Any]]]:
    """Seconds of each of ``repeats`` runs of the whole workload, and what each run returned."""
    times, measured = [], []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = run()
        synchronize(device)
        times.append(time.perf_counter() - start)
        measured.append(out or {})
    return times, measured


def median_of(values: list[Any]) -> Any:
    """The median of numbers; of dicts of numbers, the median of each key."""
    if isinstance(values[0], dict):
        return {k: statistics.median([v[k] for v in values]) for k in values[0]}
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model-shape",
        default=None,
        choices=sorted(RANDOM_MODEL_SHAPES),
        help="random weights with these shapes (default: the embedded model)",
    )
    parser.add_argument(
        "--model", default=None, help="a Hugging Face checkpoint directory (default: the embedded model)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument(
        "--attention-backend", default="auto", help="modkit and pipeline: auto, torch_batched, triton, torch_ref"
    )
    parser.add_argument("--enforce-eager", action="store_true", help="modkit and pipeline: no CUDA graphs")
    parser.add_argument("--hf-batch-size", type=int, default=None, help="default: all prompts in one batch")
    parser.add_argument("--engines", nargs="+", default=["modkit", "hf", "vllm"], choices=list(RUNNERS))
    parser.add_argument("--num-workers", type=int, default=1, help="pipeline: workers (replicas; one GPU is shared)")
    parser.add_argument("--stream", action="store_true", help="pipeline: stream, and report the mean TTFT")
    parser.add_argument(
        "--client-procs",
        type=int,
        default=min(8, (os.cpu_count() or 1) // 2) if (os.cpu_count() or 1) >= 8 else 1,
        help="pipeline: client processes sending the requests (default: half the cores, at most 8; 1 below 8 cores)",
    )
    parser.add_argument(
        "--record", action="store_true", help="pipeline: record the event stream in this process, as notebooks do"
    )
    parser.add_argument(
        "--save-trace", default=None, metavar="PATH", help="pipeline, with --record: save the timed runs' trace"
    )
    parser.add_argument(
        "--warmup-prompts", type=int, default=None, help="prompts of each engine's warm-up (default: a full batch)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine; the median is reported")
    parser.add_argument("--out", default="results/benchmark_offline.json")
    args = parser.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.warmup_prompts is None:
        args.warmup_prompts = min(args.num_prompts, args.max_num_seqs)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir = Path(args.model)
        else:
            model_dir = make_random_checkpoint(args.model_shape, tmp) if args.model_shape else embedded_model_dir()
        vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
        rng = random.Random(0)
        prompts = [[rng.randrange(3, min(vocab, 2000)) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
        results: dict[str, Any] = {}
        texts: dict[str, list[str]] = {}
        for name in args.engines:
            with ExitStack() as stack:  # the engine's processes, if any, stop when it is done
                try:
                    run = RUNNERS[name](Path(model_dir), prompts, args, stack)
                except ImportError as err:
                    print(f"{name}: skipped ({err})")
                    results[name] = {"skipped": str(err)}
                    continue
                times, measured = timed(run, args.repeats, args.device)
                del run
            seconds, last = statistics.median(times), measured[-1]
            texts[name] = last.get("texts", [])
            # Each run checks that it made every token, so the count is the same every run.
            tokens = last.get("output_tokens", args.num_prompts * args.output_len)
            numbers = [k for k in last if k not in ("texts", "output_tokens")]
            extra = {k: median_of([m[k] for m in measured]) for k in numbers}
            results[name] = {"seconds": seconds, "runs_s": times, "output_tokens_per_s": tokens / seconds, **extra}
            scalars = "".join(f", {k} {v:.3g}" for k, v in extra.items() if not isinstance(v, dict))
            print(
                f"{name}: median {seconds:.2f} s of {[round(t, 2) for t in times]}, "
                f"{tokens / seconds:,.0f} output tok/s{scalars}",
                flush=True,
            )
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()

    pipeline, llm = results.get("pipeline", {}), results.get("modkit", {})
    for name in ("pipeline", "pipeline-sync"):
        split = results.get(name, {})
        if "seconds" in split and "seconds" in llm:  # the cost of the process split, on the same prompts
            split["vs_modkit"] = split["output_tokens_per_s"] / llm["output_tokens_per_s"]
            split["outputs_equal_modkit"] = sum(a == b for a, b in zip(texts[name], texts["modkit"], strict=True))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    meta = {
        "model": args.model or args.model_shape or "embedded tiny-chat",
        "device": args.device,
        "device_name": device_name,
        "dtype": args.dtype,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "repeats": args.repeats,
        "warmup_prompts": args.warmup_prompts,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(
        f"\nOffline throughput, {meta['model']}, {args.num_prompts} prompts x {args.input_len} in / "
        f"{args.output_len} out, greedy, ignore_eos, {args.dtype} on {device_name}"
    )
    print(f"{'engine':<13}{'median s':>10}{'out tok/s':>12}{'vs hf':>8}{'vs vllm':>9}{'vs modkit':>11}")
    for name, r in results.items():
        if "seconds" not in r:
            print(f"{name:<13}{'skipped':>10}")
            continue
        ratio = {
            k: r["output_tokens_per_s"] / results[k]["output_tokens_per_s"]
            for k in ("hf", "vllm", "modkit")
            if "seconds" in results.get(k, {})
        }
        print(
            f"{name:<13}{r['seconds']:>10.2f}{r['output_tokens_per_s']:>12,.0f}"
            f"{ratio.get('hf', float('nan')):>8.2f}{ratio.get('vllm', float('nan')):>9.2f}"
            f"{ratio.get('modkit', float('nan')):>11.2f}"
        )
    if "seconds" in pipeline:
        notes = [f"launched in {pipeline['launch_s']:.1f} s (not timed)"]
        if "mean_ttft_s" in pipeline:
            notes.append(f"mean TTFT {pipeline['mean_ttft_s']:.2f} s")
        if "vs_modkit" in pipeline:
            notes.append(f"{pipeline['vs_modkit']:.2f}x the in-process LLM's throughput")
            notes.append(f"{pipeline['outputs_equal_modkit']}/{args.num_prompts} outputs equal to the LLM's")
        print("pipeline: " + "; ".join(notes))
        print(
            f"pipeline, per step (ms): wall {pipeline['wall_ms']:.1f}; worker {pipeline['worker_ms']:.1f} from plan "
            f"sent to result back (forward {pipeline['forward_ms']:.1f}, sample {pipeline['sample_ms']:.1f}; with "
            f"async scheduling a plan also waits there for the step before it); scheduler: schedule "
            f"{pipeline['schedule_ms']:.1f} ({pipeline['kv_round_trips']:.1f} KV round trips, waiting "
            f"{pipeline['kv_wait_ms']:.1f}, of which the KV cache manager worked {pipeline['kv_manager_ms']:.1f}), "
            f"update {pipeline['update_ms']:.1f}"
        )
        busy = ", ".join(f"{name} {share:.0%}" for name, share in pipeline.get("loop_busy", {}).items())
        print(f"pipeline, serve loops busy (a worker's includes waiting for its GPU): {busy}")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
