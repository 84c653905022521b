#!/usr/bin/env python
"""Offline throughput: modkit's LLM against HF generate (static batches) and vLLM's LLM.

    python scripts/benchmark.py                                   # embedded model, CPU
    python scripts/benchmark.py --model-shape qwen2.5-0.5b --device cuda --num-prompts 1024 \\
        --input-len 256 --output-len 128                          # a GPU

Every engine gets the same prompts (random token ids of one length, so HF needs no
padding), greedy decoding and ``ignore_eos``, so each produces exactly num_prompts x
output_len tokens. Each warms up on a few prompts, then runs the whole workload --repeats
times; the median is reported. A table is printed last; the full results go to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from modkit.checks import RANDOM_MODEL_SHAPES, load_hf_model, make_random_checkpoint
from modkit.model import embedded_model_dir


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_modkit(model_dir: Path, prompts: list[list[int]], args: argparse.Namespace) -> Callable[[], None]:
    from modkit import LLM, SamplingParams

    llm = LLM(
        model_dir,
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_kv_blocks=args.num_kv_blocks,
    )
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)

    def run(ps: list[list[int]]) -> None:
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)

    run(prompts[:4])  # warm-up
    return lambda: run(prompts)


def bench_hf(model_dir: Path, prompts: list[list[int]], args: argparse.Namespace) -> Callable[[], None]:
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

    run(prompts[:4])
    return lambda: run(prompts)


def bench_vllm(model_dir: Path, prompts: list[list[int]], args: argparse.Namespace) -> Callable[[], None]:
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
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)  # type: ignore[misc]
        assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)

    run(prompts[:4])
    return lambda: run(prompts)


def timed(run: Callable[[], None], repeats: int, device: str) -> list[float]:
    """Seconds of each of ``repeats`` runs of the whole workload."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model-shape",
        default=None,
        choices=sorted(RANDOM_MODEL_SHAPES),
        help="random weights with these shapes (default: the embedded model)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--hf-batch-size", type=int, default=None, help="default: all prompts in one batch")
    parser.add_argument("--engines", nargs="+", default=["modkit", "hf", "vllm"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine; the median is reported")
    parser.add_argument("--out", default="results/benchmark_offline.json")
    args = parser.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_random_checkpoint(args.model_shape, tmp) if args.model_shape else embedded_model_dir()
        vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
        rng = random.Random(0)
        prompts = [[rng.randrange(3, min(vocab, 2000)) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
        results: dict[str, Any] = {}
        runners = {"modkit": bench_modkit, "hf": bench_hf, "vllm": bench_vllm}
        for name in args.engines:
            try:
                run = runners[name](Path(model_dir), prompts, args)
            except ImportError as err:
                print(f"{name}: skipped ({err})")
                results[name] = {"skipped": str(err)}
                continue
            times = timed(run, args.repeats, args.device)
            del run
            seconds = statistics.median(times)
            tokens = args.num_prompts * args.output_len
            results[name] = {"seconds": seconds, "runs_s": times, "output_tokens_per_s": tokens / seconds}
            print(
                f"{name}: median {seconds:.2f} s of {[round(t, 2) for t in times]}, "
                f"{tokens / seconds:,.0f} output tok/s",
                flush=True,
            )
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    meta = {
        "model": args.model_shape or "embedded tiny-chat",
        "device": args.device,
        "device_name": device_name,
        "dtype": args.dtype,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "repeats": args.repeats,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(
        f"\nOffline throughput, {meta['model']}, {args.num_prompts} prompts x {args.input_len} in / "
        f"{args.output_len} out, greedy, ignore_eos, {args.dtype} on {device_name}"
    )
    print(f"{'engine':<10}{'median s':>10}{'out tok/s':>12}{'vs hf':>8}{'vs vllm':>9}")
    for name, r in results.items():
        if "seconds" not in r:
            print(f"{name:<10}{'skipped':>10}")
            continue
        ratio = {
            k: r["output_tokens_per_s"] / results[k]["output_tokens_per_s"]
            for k in ("hf", "vllm")
            if "seconds" in results.get(k, {})
        }
        print(
            f"{name:<10}{r['seconds']:>10.2f}{r['output_tokens_per_s']:>12,.0f}"
            f"{ratio.get('hf', float('nan')):>8.2f}{ratio.get('vllm', float('nan')):>9.2f}"
        )
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
