#!/usr/bin/env python
"""On the CPU: the pipeline at several ``cpu_parallel_min_tokens``, side by side, in one run.

    python scripts/cpu_threads.py                          # 64 (the 2-core default) against 1, 3 rounds
    python scripts/cpu_threads.py --settings 1 16 64 256 --rounds 2 --out results/cpu_threads.json

A CPU worker runs a step of fewer than ``cpu_parallel_min_tokens`` tokens on one of its threads
and a bigger one on all of them (``PipelineConfig.cpu_parallel_min_tokens``; 1: every step on
every thread). One pipeline per setting is launched and warmed up first; then each round serves
every workload on every pipeline, the pipelines taking turns going first, so that a machine
whose other load comes and goes weighs on each alike. The workloads (the embedded model):

- ``moderate``: 60 Poisson requests at 5 a second, 64-token prompts sharing their first 32, 64
  output tokens (the simulator's fidelity workload: about three requests a step);
- ``2x rate``: the same at 10 a second;
- ``burst``: 64 requests at once, 64-token prompts, 64 output tokens;
- ``long prompts``: 32 requests at once, 256-token prompts, 16 output tokens (prompt steps of
  up to 2,048 tokens: where the threads pay);
- ``200 at once``: 200 requests at once, 128-token prompts, 64 output tokens (what
  ``scripts/benchmark_cpu.py`` serves; not run unless named in ``--workloads``).

Prints, per workload and setting, the median over the rounds (and the range) of the output
throughput, TTFT p50, ITL p50 and the worker's own forward of a decode step of three requests,
and the CPU seconds every process of the pipeline used per output token; ``--out`` saves the
machine, the settings and every run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from sim_fidelity import machine  # noqa: E402  (one description of the machine for both scripts)

from modkit import Pipeline, loadgen  # noqa: E402
from modkit.sim import Workload  # noqa: E402
from modkit.trace.events import ForwardEvent  # noqa: E402

# name -> (requests, rate per second or inf, prompt tokens, shared prefix, output tokens)
WORKLOADS: dict[str, tuple[int, float, int, int, int]] = {
    "moderate": (60, 5.0, 64, 32, 64),
    "2x rate": (60, 10.0, 64, 32, 64),
    "burst": (64, float("inf"), 64, 0, 64),
    "long prompts": (32, float("inf"), 256, 0, 16),
    "200 at once": (200, float("inf"), 128, 0, 64),
}
WARM_UP_SEED = 1_000


def serve(pipeline: Pipeline, name: str, seed: int) -> dict[str, Any]:
    """One workload on ``pipeline``: its summary, the median decode step of three, the CPU seconds."""
    num, rate, prompt_len, shared, output_len = WORKLOADS[name]
    drawn_at = rate if rate != float("inf") else 1e6  # Poisson offsets of a burst: all at once
    workload = Workload.poisson(num, drawn_at, prompt_len, output_len, seed, shared_prefix=shared)
    pipeline.clear_trace()
    loadgen.open_loop(f"{pipeline.url}/v1", pipeline.model_name, workload.prompts, rate, output_len, seed)
    trace = pipeline.trace(settle_s=0.5)
    summary = trace.summary()
    decodes = [e for e in trace.events if isinstance(e, ForwardEvent) and e.num_seqs == 3 and e.num_tokens == 3]
    cpu_s = sum(s for process, s in trace.meta.get("cpu_s", {}).items() if process != "launcher")
    return {
        "output_throughput": summary.output_throughput,
        "ttft_p50_s": summary.ttft_p50_s,
        "itl_p50_s": summary.itl_p50_s,
        "decode3_forward_s": float(np.median([e.forward_s for e in decodes])) if decodes else None,
        "cpu_s_per_token": cpu_s / summary.num_output_tokens if summary.num_output_tokens else None,
        "load_average": os.getloadavg()[0],
    }


def cell(values: list[float | None], scale: float = 1.0, digits: int = 1) -> str:
    """The median and the range of ``values`` (scaled), or ``-`` where none was measured."""
    kept = [v * scale for v in values if v is not None]
    if not kept:
        return "-"
    return f"{np.median(kept):,.{digits}f} [{min(kept):,.{digits}f}, {max(kept):,.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=int, nargs="+", default=[64, 1], help="cpu_parallel_min_tokens values")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS)[:4], choices=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the machine, the settings and every run here")
    args = parser.parse_args()
    if any(s < 1 for s in args.settings):
        parser.error("--settings: each cpu_parallel_min_tokens is an integer >= 1")
    host = {**machine("cpu"), "load_average_before": os.getloadavg()}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {w: {s: [] for s in args.settings} for w in args.workloads}
    pipelines: dict[int, Pipeline] = {}
    try:
        for setting in args.settings:
            pipeline = Pipeline.launch(ports="auto", seed=0, progress=False, cpu_parallel_min_tokens=setting)
            pipelines[setting] = pipeline
            for name in args.workloads:  # warm-up: a fresh pipeline's first requests are slow
                serve(pipeline, name, WARM_UP_SEED)
        for round_ in range(args.rounds):
            order = args.settings if round_ % 2 == 0 else args.settings[::-1]
            for name in args.workloads:
                for setting in order:
                    runs[name][setting].append(serve(pipelines[setting], name, seed=round_ + 1))
                    print(f"round {round_ + 1}, {name}, cpu_parallel_min_tokens={setting}: done", flush=True)
    finally:
        for pipeline in pipelines.values():
            pipeline.shutdown()
    host["load_average_after"] = os.getloadavg()
    print(
        "\n| workload | cpu_parallel_min_tokens | output tok/s | TTFT p50 ms | ITL p50 ms "
        "| forward of a 3-request decode, ms | CPU s per 1k output tokens |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, by_setting in runs.items():
        for setting, measured in by_setting.items():
            column = {key: [m[key] for m in measured] for key in measured[0]}
            print(
                f"| {name} | {setting} | {cell(column['output_throughput'], digits=0)} "
                f"| {cell(column['ttft_p50_s'], 1e3)} | {cell(column['itl_p50_s'], 1e3)} "
                f"| {cell(column['decode3_forward_s'], 1e3, 2)} | {cell(column['cpu_s_per_token'], 1e3, 2)} |"
            )
    print(f"\nload average {host['load_average_before'][0]:.1f} before, {host['load_average_after'][0]:.1f} after")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        settings = {"settings": args.settings, "rounds": args.rounds, "workloads": {w: WORKLOADS[w] for w in runs}}
        result = {"machine": host, **settings, "runs": {w: {str(s): m for s, m in r.items()} for w, r in runs.items()}}
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
