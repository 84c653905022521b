"""How long ``Pipeline.swap`` takes, per component, on an idle pipeline (embedded model, two workers).

Each swap goes in and back three times; the table gives the median and the slowest of the
three swaps in (the slowest includes a first import, e.g. of vLLM). With vLLM installed,
vLLM's sampler, scheduler and KV cache manager are swapped too (the last two after a drain,
here of nothing).

    python scripts/swap_latency.py [--out swap_latency.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time

from modkit import Pipeline

PLAN = [
    ("scheduler", "sjf", "fcfs"),
    ("kv_cache_manager", "lfu", "lru"),
    ("router", "least_loaded", "round_robin"),
    ("sampler", "per_request", "default"),
    ("attention", "torch_ref", "torch_batched"),
]
VLLM_PLAN = [("sampler", "vllm", "default"), ("scheduler", "vllm", "modkit"), ("kv_cache_manager", "vllm", "modkit")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    plan = PLAN + (VLLM_PLAN if importlib.util.find_spec("vllm") is not None else [])
    rows = []
    with Pipeline.launch(num_workers=2, num_kv_blocks=64, progress=False) as p:
        for component, new, old in plan:
            seconds = []
            for _ in range(3):
                t0 = time.perf_counter()
                p.swap(component, new)
                seconds.append(time.perf_counter() - t0)
                p.swap(component, old)
            rows.append(
                {
                    "component": component,
                    "implementation": new,
                    "median_ms": 1e3 * statistics.median(seconds),
                    "max_ms": 1e3 * max(seconds),
                }
            )
    print(f"{'component':18} {'implementation':15} {'median ms':>10} {'max ms':>10}")
    for r in rows:
        print(f"{r['component']:18} {r['implementation']:15} {r['median_ms']:10.1f} {r['max_ms']:10.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
