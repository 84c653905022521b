"""Time the attention backends on one layer's flat batches of a Qwen2.5-0.5B-shaped model (14 query heads,
2 key/value heads, head size 64), on a CUDA GPU.

    python scripts/bench_attention.py [--backends torch_batched triton] [--dtype bfloat16] [--out attention.json]

Three batches: 256 decodes over 384 tokens of context each; 8 prompts of 512 tokens; and a
mixed step (192 decodes and 2 chunks of 256 tokens after 256 cached ones). Each backend runs
each batch 20 times after 3 warm-ups; the table gives the median time per call.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from modkit.attention import AttentionMetadata, get_attention_backend
from modkit.attention.interface import metadata_from_lengths

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 14, 2, 64, 16
BATCHES = {
    "256 decodes, ctx 384": [(384, 1)] * 256,
    "8 prompts of 512": [(0, 512)] * 8,
    "mixed: 192 decodes + 2 chunks": [(384, 1)] * 192 + [(256, 256)] * 2,
}


def metadata(lens: list[tuple[int, int]], device: torch.device) -> tuple[AttentionMetadata, int]:
    tables, next_block = [], 1
    for computed, new in lens:
        count = -(-(computed + new) // BLOCK)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    return metadata_from_lengths(lens, tables, BLOCK, device), next_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torch_ref", "torch_batched", "triton"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    rows = []
    for name, lens in BATCHES.items():
        md, num_blocks = metadata(lens, device)
        t = md.num_tokens
        q = torch.randn(t, HEADS, HEAD_DIM, device=device, dtype=dtype)
        k = torch.randn(t, KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
        v = torch.randn(t, KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
        cache = torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
        row = {"batch": name}
        for backend_name in args.backends:
            backend = get_attention_backend(backend_name)
            times = []
            for i in range(23):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                backend.forward(q, k, v, cache, md, HEAD_DIM**-0.5)
                end.record()
                torch.cuda.synchronize()
                if i >= 3:
                    times.append(start.elapsed_time(end))
            row[backend_name] = statistics.median(times)
        rows.append(row)
    print(f"{'batch':32}" + "".join(f"{b:>16}" for b in args.backends) + "   (ms per layer call)")
    for row in rows:
        print(f"{row['batch']:32}" + "".join(f"{row[b]:16.3f}" for b in args.backends))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "dtype": args.dtype, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
