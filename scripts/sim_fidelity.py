#!/usr/bin/env python
"""How close modkit.sim comes to live runs: fit on one live run, predict others, run them live.

    python scripts/sim_fidelity.py                       # the embedded model on the CPU
    python scripts/sim_fidelity.py --runs 3 --num-requests 60 --rate 5 --out fidelity.json

A cost model is fitted on one live run of the base configuration. Then, for each
configuration (another rate, budget, block count, worker count...), ``--runs`` live runs
(Poisson workloads of seeds 1, 2, ...) and the simulation of each one's recorded workload
under that configuration. Prints a markdown table of the medians over the runs: output
throughput, TTFT p50, ITL p50, preemptions and prefix-hit rate, live and simulated.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np

from modkit import Pipeline, loadgen
from modkit.sim import CostModel, Workload, simulate, workload_from_trace
from modkit.trace import Trace
from modkit.trace.summary import TraceSummary

# name -> (PipelineConfig overrides, request rate multiplier)
CONFIGS: dict[str, tuple[dict[str, Any], float]] = {
    "base": ({}, 1.0),
    "2x rate": ({}, 2.0),
    "budget 64": ({"max_num_batched_tokens": 64}, 1.0),
    "16 KV blocks": ({"num_kv_blocks": 16}, 1.0),
    "2 workers": ({"num_workers": 2}, 2.0),
}
METRICS = ("output_throughput", "ttft_p50_s", "itl_p50_s", "num_preemptions", "prefix_hit_rate")


def live_run(pipeline: Pipeline, workload: Workload, rate: float, output_len: int) -> Trace:
    pipeline.clear_trace()
    loadgen.open_loop(f"{pipeline.url}/v1", pipeline.model_name, workload.prompts, rate, output_len, seed=0)
    return pipeline.trace(settle_s=0.5)


def pair(live: dict[str, float], sim: dict[str, float], metric: str, scale: float = 1.0) -> str:
    """``live / simulated (error)`` for one metric."""
    error = (sim[metric] - live[metric]) / live[metric] if live[metric] else 0.0
    return f"{scale * live[metric]:.1f} / {scale * sim[metric]:.1f} ({error:+.0%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=60)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--shared-prefix", type=int, default=32)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", default=None, help="write every run's summaries here (JSON)")
    args = parser.parse_args()

    def workload(seed: int, rate: float) -> Workload:
        return Workload.poisson(
            args.num_requests, rate, args.prompt_len, args.output_len, seed, shared_prefix=args.shared_prefix
        )

    cost: CostModel | None = None
    rows: dict[str, dict[str, list[TraceSummary]]] = {}
    for name in ["base", *[c for c in args.configs if c != "base"]]:
        overrides, rate_factor = CONFIGS[name]
        rate = args.rate * rate_factor
        with Pipeline.launch(ports="auto", seed=0, progress=False, **overrides) as pipeline:
            if cost is None:  # the run the cost model is fitted on, not one of those predicted
                cost = CostModel.fit(live_run(pipeline, workload(0, args.rate), args.rate, args.output_len))
                print(cost, flush=True)
            runs = rows[name] = {"live": [], "simulated": []}
            for seed in range(1, args.runs + 1):
                trace = live_run(pipeline, workload(seed, rate), rate, args.output_len)
                runs["live"].append(trace.summary())
                runs["simulated"].append(simulate(workload_from_trace(trace), cost, **overrides).summary())
                print(name, seed, runs["live"][-1].to_dict(), runs["simulated"][-1].to_dict(), flush=True)
        if name not in args.configs:
            del rows[name]

    print(f"\nload average {os.getloadavg()}\n")
    print("| configuration | tok/s live / sim | TTFT p50 ms live / sim | ITL p50 ms live / sim | preemptions | hits |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, runs in rows.items():
        live = {m: float(np.median([getattr(s, m) for s in runs["live"]])) for m in METRICS}
        sim = {m: float(np.median([getattr(s, m) for s in runs["simulated"]])) for m in METRICS}
        print(
            f"| {name} | {pair(live, sim, 'output_throughput')} | {pair(live, sim, 'ttft_p50_s', 1e3)} "
            f"| {pair(live, sim, 'itl_p50_s', 1e3)} | {live['num_preemptions']:.0f} / {sim['num_preemptions']:.0f} "
            f"| {live['prefix_hit_rate']:.2f} / {sim['prefix_hit_rate']:.2f} |"
        )
    if args.out:
        data = {n: {k: [s.to_dict() for s in v] for k, v in r.items()} for n, r in rows.items()}
        with open(args.out, "w") as f:
            json.dump({"cost_model": cost.describe() if cost else None, "runs": data}, f, indent=1)


if __name__ == "__main__":
    main()
