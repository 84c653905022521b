#!/usr/bin/env python
"""Online serving: latency and throughput of the pipeline's OpenAI API under Poisson load, as vLLM's benchmark_serving.

    python scripts/benchmark_online.py                            # embedded model, CPU, rates 2 and 4
    python scripts/benchmark_online.py --model-shape qwen2.5-0.5b --device cuda --num-prompts 512 \\
        --input-len 256 --output-len 128                          # a GPU, rates 4 8 16 32 inf
    python scripts/benchmark_online.py --request-rates 1 2 inf    # any rates (requests per second)

The six-process pipeline is launched once (its launch is not timed) and warmed up on
--warmup-prompts requests sent at once. Then, for each request rate, --num-prompts requests
arrive as a Poisson process (exponential gaps between sends, the same seeded pattern at
every rate; ``inf`` sends them all at once). Each is a streamed completion of random token
ids (--input-len of them, fresh ones at every rate so the prefix cache never hits), greedy,
with ``ignore_eos``, so it makes exactly --output-len tokens (counted from ``usage``).

What is measured, per request (``modkit.loadgen``, which sends them):

- TTFT: from sending the request to its first streamed chunk that carries a choice.
- ITL (inter-token latency): the gaps between successive such chunks. The pipeline streams
  one chunk per engine step, holding the tokens that step made for the request (one, unless
  a step makes several); a chunk's text may be "" (the first bytes of a character), yet it
  still holds its tokens. As in vLLM, a chunk of several tokens counts as one gap.
- TPOT (time per output token): (E2E - TTFT) / (output tokens - 1), whatever the chunking.
- E2E: from sending the request to the end of its stream.

And per rate: output tokens and requests per second over the run's wall time (first send
to last stream's end), the p50, p99 and mean of each latency over every request (ITL over
every gap), and the share of one core this process used (near 1.0, the client itself was
the bottleneck and its latencies are inflated). A table is printed last; the results go
to --out as JSON, a plot of latencies and throughput against the rate to --plot.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import math
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import openai
import torch

from modkit import Pipeline
from modkit.checks import RANDOM_MODEL_SHAPES, make_random_checkpoint
from modkit.loadgen import rate_label, run_rate, summarize
from modkit.model import embedded_model_dir


async def benchmark(pipeline: Pipeline, args: argparse.Namespace, vocab: int) -> list[dict[str, Any]]:
    """Warm up, then one run per rate; a row per rate."""
    rng = random.Random(args.seed)

    def fresh_prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(3, min(vocab, 2000)) for _ in range(args.input_len)] for _ in range(n)]

    rows = []
    # One client for every run: it belongs to this event loop. Its pool of 1,000 connections is
    # plenty: the scheduler queues all but max_num_seqs requests anyway.
    async with openai.AsyncOpenAI(base_url=f"{pipeline.url}/v1", api_key="modkit", max_retries=0) as client:
        await run_rate(client, pipeline.model_name, fresh_prompts(args.warmup_prompts), math.inf, args.output_len, 0)
        for rate in args.request_rates:
            if args.record:
                pipeline.clear_trace()
            cpu = time.process_time()
            results, duration = await run_rate(
                client, pipeline.model_name, fresh_prompts(args.num_prompts), rate, args.output_len, args.seed
            )
            cpu = time.process_time() - cpu
            counts = [r.output_tokens for r in results]
            assert all(n == args.output_len for n in counts), f"output tokens {counts}, not {args.output_len} each"
            row = summarize(rate, results, duration, cpu)
            if args.record:
                row["engine"] = engine_side(pipeline)
            print(
                f"rate {rate:g}: {row['request_throughput']:.2f} req/s, {row['output_throughput']:,.0f} out tok/s, "
                f"TTFT p50 {row['median_ttft_ms']:.1f} ms, E2E p50 {row['median_e2el_ms'] / 1e3:.2f} s",
                flush=True,
            )
            rows.append(row)
    return rows


def engine_side(pipeline: Pipeline) -> dict[str, float]:
    """Where TTFT goes, from the pipeline's own trace (p50s, ms): arrival at the frontend -> first
    scheduled (queue), -> first token back at the frontend (engine TTFT); the steps' wall times,
    prompt-carrying steps (eager) apart from decode-only ones (CUDA graphs)."""
    trace = pipeline.trace()
    requests, steps = trace.requests, trace.steps
    mixed = steps[steps.num_prompt_tokens > 0]
    decode = steps[steps.num_prompt_tokens == 0]
    return {
        "queue_ms": 1e3 * float(requests.queue_time.median()),
        "engine_ttft_ms": 1e3 * float(requests.ttft.median()),
        "prompt_step_ms": 1e3 * float(mixed.step_s.median()) if len(mixed) else math.nan,
        "decode_step_ms": 1e3 * float(decode.step_s.median()) if len(decode) else math.nan,
        "prompt_step_schedule_ms": 1e3 * float(mixed.schedule_s.median()) if len(mixed) else math.nan,
        "share_of_steps_with_prompts": len(mixed) / max(1, len(steps)),
    }


def launch(model_dir: Path, args: argparse.Namespace) -> Pipeline:
    """The six-process pipeline on free ports."""
    from modkit.config import free_component_ports

    config: dict[str, Any] = free_component_ports()
    return Pipeline.launch(
        model=str(model_dir),
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_kv_blocks=args.num_kv_blocks,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        progress=False,
        record=args.record,  # the event stream, for engine_side()
        **config,
    )


def plot(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """TTFT, ITL (p50 and p99) and output throughput against the request rate, one panel each."""
    from matplotlib.figure import Figure

    x = range(len(rows))  # evenly spaced: the rates double, and inf has no place on a numeric axis
    labels = [rate_label(r["request_rate"]) for r in rows]
    figure = Figure(figsize=(15.0, 4.0), layout="constrained")
    ttft, itl, throughput = figure.subplots(1, 3)
    for ax, name, label in ((ttft, "ttft", "TTFT"), (itl, "itl", "ITL")):
        ax.plot(x, [r[f"median_{name}_ms"] for r in rows], marker="o", label="p50")
        ax.plot(x, [r[f"p99_{name}_ms"] for r in rows], marker="o", linestyle="--", label="p99")
        ax.set_ylabel(f"{label} (ms)")
        ax.legend()
    throughput.plot(x, [r["output_throughput"] for r in rows], marker="o")
    throughput.set_ylabel("output tokens/s")
    for ax, name in ((ttft, "time to first token"), (itl, "inter-token latency"), (throughput, "throughput")):
        ax.set_title(name)
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=None, help="a Hugging Face checkpoint directory (default: the embedded model)"
    )
    parser.add_argument(
        "--model-shape",
        default=None,
        choices=sorted(RANDOM_MODEL_SHAPES),
        help="random weights with these shapes (default: the embedded model)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument(
        "--request-rates",
        type=float,
        nargs="+",
        default=None,
        help="requests per second, one run each; inf sends all at once (default: 4 8 16 32 inf on GPU, 2 4 on CPU)",
    )
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per rate")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--warmup-prompts", type=int, default=None, help="sent at once first (default: a full batch)")
    parser.add_argument("--seed", type=int, default=0, help="of the prompts and the arrival times")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--attention-backend", default="auto", help="auto, torch_batched, triton, torch_ref")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--out", default="results/benchmark_online.json")
    parser.add_argument("--plot", default=None, help="PNG (default: --out with .png)")
    parser.add_argument(
        "--record", action="store_true", help="record the event stream: TTFT split into queue, steps and transit"
    )
    args = parser.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.request_rates is None:
        args.request_rates = [4.0, 8.0, 16.0, 32.0, math.inf] if args.device.startswith("cuda") else [2.0, 4.0]
    if args.warmup_prompts is None:
        args.warmup_prompts = min(args.num_prompts, args.max_num_seqs)
    out = Path(args.out)
    plot_path = Path(args.plot) if args.plot else out.with_suffix(".png")

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir = Path(args.model)
        else:
            model_dir = make_random_checkpoint(args.model_shape, tmp) if args.model_shape else embedded_model_dir()
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        start = time.perf_counter()
        with launch(model_dir, args) as pipeline:
            launch_s = time.perf_counter() - start
            print(f"pipeline launched in {launch_s:.1f} s (not timed)", flush=True)
            rows = asyncio.run(benchmark(pipeline, args, vocab))

    # Asked only now: CUDA in this process would have taken GPU memory from the worker's KV cache.
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    meta = {
        "model": args.model or args.model_shape or "embedded tiny-chat",
        "device": args.device,
        "device_name": device_name,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "openai": openai.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "launch_s": launch_s,
        "args": {**vars(args), "request_rates": [r if math.isfinite(r) else "inf" for r in args.request_rates]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    title = (
        f"Online serving, {meta['model']}, {args.num_prompts} requests x {args.input_len} in / {args.output_len} out, "
        f"{args.dtype} on {device_name}"
    )
    plot(rows, title, plot_path)

    print(f"\n{title}, Poisson arrivals, greedy, ignore_eos (latencies in ms, E2E in s)")
    print(
        f"{'rate':>6}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'p99':>9}{'mean':>9}"
        f"{'ITL p50':>9}{'p99':>9}{'mean':>9}{'E2E p50':>9}"
    )
    for r in rows:
        ms = {k: math.nan if v is None else v for k, v in r.items() if k.endswith("_ms")}  # no ITL for 1 token
        print(
            f"{rate_label(r['request_rate']):>6}{r['request_throughput']:>8.2f}{r['output_throughput']:>11,.0f}"
            f"{ms['median_ttft_ms']:>10.1f}{ms['p99_ttft_ms']:>9.1f}{ms['mean_ttft_ms']:>9.1f}"
            f"{ms['median_itl_ms']:>9.1f}{ms['p99_itl_ms']:>9.1f}{ms['mean_itl_ms']:>9.1f}"
            f"{ms['median_e2el_ms'] / 1e3:>9.2f}"
        )
    if args.record:
        print("engine side (p50, ms): queue = arrival at the frontend -> first scheduled; engine TTFT -> first")
        print("token back at the frontend; step wall times, steps with prompt tokens apart")
        for r in rows:
            e = r["engine"]
            print(
                f"{rate_label(r['request_rate']):>6}  queue {e['queue_ms']:.1f}  engine TTFT {e['engine_ttft_ms']:.1f}"
                f"  prompt steps {e['prompt_step_ms']:.1f} (schedule {e['prompt_step_schedule_ms']:.1f})"
                f"  decode steps {e['decode_step_ms']:.1f}  steps with prompts {e['share_of_steps_with_prompts']:.0%}"
            )
    busy = [r["request_rate"] for r in rows if r["client_cpu_share"] > 0.8]
    if busy:
        print(f"NOTE: the client used over 80% of a core at rates {busy}: its latencies there include its own wait")
    print(f"saved {out} and {plot_path}")


if __name__ == "__main__":
    main()
