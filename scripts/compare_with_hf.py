#!/usr/bin/env python
"""Compare modkit's paged forward with Hugging Face transformers, on CPU or GPU.

    python scripts/compare_with_hf.py                                  # float32 on CPU
    python scripts/compare_with_hf.py --device cuda --dtype bfloat16   # on a GPU

For each model (the embedded tiny model and random-weight checkpoints built from configs,
including one with Qwen2.5-0.5B-Instruct's exact shapes) and each block size, it runs a
mixed schedule (chunked prompts and decode tokens in the same forwards) and compares every
logit; then greedy continuations against HF ``generate``. In a low-precision dtype, modkit's
distance from HF in float32 is printed beside HF's own (the bf16 noise floor).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from modkit.checks import RANDOM_MODEL_SHAPES, compare_greedy, compare_mixed_batch, make_random_checkpoint
from modkit.model import embedded_model_dir, encode_chat, load_tokenizer, parse_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["tiny", "qwen2", "qwen2-untied", "qwen3", "llama3"],
        help=f"'tiny' and/or shapes from {sorted(RANDOM_MODEL_SHAPES)}",
    )
    parser.add_argument("--block-sizes", nargs="+", type=int, default=[1, 16, 7])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    dtype = parse_dtype(args.dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = embedded_model_dir() if name == "tiny" else make_random_checkpoint(name, Path(tmp) / name)
            for block_size in args.block_sizes:
                start = time.perf_counter()
                stats = compare_mixed_batch(
                    path, dtype=dtype, device=args.device, block_size=block_size, prompt_lens=(12, 64, 31, 1, 100, 17)
                )
                rows.append({"model": name, "block_size": block_size, **stats, "seconds": time.perf_counter() - start})
                print(json.dumps(rows[-1]))
        greedy = {}
        if "tiny" in args.models:
            tokenizer = load_tokenizer(None)
            questions = [
                "Hello!",
                "What does a cow say?",
                "What is 2 plus 3?",
                "Who are you?",
                "What color is the sky?",
                "What is the capital of France?",
                "Thank you!",
                "Good night!",
            ]
            prompts = [encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in questions]
            result = compare_greedy(embedded_model_dir(), prompts, dtype=dtype, device=args.device)
            greedy["tiny"] = {
                "prompts": len(prompts),
                "exact": result.num_exact,
                "first_divergence": result.first_divergence,
            }
        rng = random.Random(0)
        for name in [m for m in args.models if m != "tiny"][:1]:
            path = Path(tmp) / name
            prompts = [[rng.randrange(512) for _ in range(n)] for n in (3, 9, 17, 33, 5, 64, 40, 12)]
            result = compare_greedy(path, prompts, dtype=dtype, device=args.device)
            greedy[name] = {
                "prompts": len(prompts),
                "exact": result.num_exact,
                "first_divergence": result.first_divergence,
            }
    print(
        f"\nmodkit vs transformers, {args.dtype} on {args.device} "
        f"(torch {torch.__version__}{', ' + torch.cuda.get_device_name() if args.device.startswith('cuda') else ''})"
    )
    header = f"{'model':<14}{'block':>6}{'max|diff|':>12}{'max|logit|':>12}"
    if dtype != torch.float32:
        header += f"{'modkit-fp32':>13}{'hf-fp32':>10}{'modkit rel':>12}{'hf rel':>10}"
    print(header)
    for r in rows:
        line = f"{r['model']:<14}{r['block_size']:>6}{r['max_abs_diff']:>12.2e}{r['max_abs_logit']:>12.2f}"
        if dtype != torch.float32:
            line += f"{r['modkit_vs_fp32']:>13.2e}{r['hf_vs_fp32']:>10.2e}"
            line += f"{r['modkit_rel_err']:>12.2e}{r['hf_rel_err']:>10.2e}"
        print(line)
    for name, g in greedy.items():
        print(
            f"greedy {name}: {g['exact']}/{g['prompts']} identical to HF generate; "
            f"first divergence per prompt: {g['first_divergence']}"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "dtype": args.dtype,
                    "device": args.device,
                    "rows": rows,
                    "greedy": greedy,
                    "torch": torch.__version__,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
