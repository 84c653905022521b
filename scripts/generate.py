#!/usr/bin/env python
"""Chat with a model through modkit's paged forward (greedy, all prompts in one batch).

    python scripts/generate.py "Hello!" "What does a cow say?"
    python scripts/generate.py --model Qwen/Qwen2.5-0.5B-Instruct --device cuda "Hello!"

With no --model this runs the tiny chat model embedded in data/models/tiny-chat.
"""

from __future__ import annotations

import argparse
import time

import torch

from modkit.model import encode_chat, load_model, load_tokenizer
from modkit.worker import ModelRunner, PagedKVCache, greedy_generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="+", help="user messages (or raw text with --no-chat)")
    parser.add_argument("--model", default=None, help="local folder or hub id (default: embedded tiny model)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: by device)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--no-chat", action="store_true", help="send prompts as raw text, no chat template")
    args = parser.parse_args()

    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(args.model)
    dtype, device = model.lm_head.weight.dtype, model.lm_head.weight.device
    if args.no_chat:
        prompts = [tokenizer.encode(p) for p in args.prompts]
    else:
        prompts = [encode_chat(tokenizer, [{"role": "user", "content": p}]) for p in args.prompts]
    num_blocks = sum(-(-(len(p) + args.max_new_tokens) // args.block_size) for p in prompts)
    kv_cache = PagedKVCache.allocate(model.config, num_blocks, args.block_size, dtype, device)
    runner = ModelRunner(model, kv_cache)

    start = time.perf_counter()
    outputs = greedy_generate(runner, prompts, args.max_new_tokens, model.config.eos_token_ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    for prompt, output in zip(args.prompts, outputs, strict=True):
        print(f">>> {prompt}\n{tokenizer.decode(output, skip_special_tokens=True).strip()}\n")
    total = sum(len(o) for o in outputs)
    print(
        f"{len(prompts)} requests, {sum(map(len, prompts))} prompt tokens, {total} generated tokens "
        f"in {elapsed:.2f} s ({total / elapsed:.1f} tok/s) on {device} in {dtype}; "
        f"KV cache {num_blocks} blocks x {args.block_size} tokens"
    )


if __name__ == "__main__":
    main()
