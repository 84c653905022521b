#!/usr/bin/env python
"""Aggregated against disaggregated serving, and one KV connector against another, over request rates.

    python scripts/disagg_sweep.py                       # the embedded model on the CPU: aggregated vs zmq
    python scripts/disagg_sweep.py --model-shape qwen2.5-0.5b --device cuda \\
        --pipelines aggregated zmq cuda_ipc --rates 8 32 96 --num-requests 150 \\
        --prompt-len 1024 --output-len 64 --rounds 2 --out disagg_gpu.json

Each pipeline is launched once, beside the others, and warmed up: ``aggregated`` is two workers
that both prefill and decode; a connector's name (``zmq``, ``cuda_ipc``) is one prefill and one
decode worker moving blocks with that connector (``PipelineConfig.kv_connector``), with the
default thresholds of conditional disaggregation. Then, each round, at each rate, the same
Poisson workload (random prompts of ``--prompt-len`` tokens, ``--output-len`` tokens out,
greedy, ``ignore_eos``; new prompts each round) runs on every pipeline in turn, the order turning with each run. The
table gives, for each rate and pipeline, the medians over the rounds of TTFT p50/p99, ITL
p50/p99 and output throughput, and for a connector the share of prompts computed remotely and
the transfers' median time and bandwidth. On a GPU every worker gets ``--num-kv-blocks`` (so
that the pipelines fit one card together). ``--out`` writes the machine and every run as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from modkit import Pipeline, loadgen
from modkit.checks import RANDOM_MODEL_SHAPES, make_random_checkpoint
from modkit.sim import Workload

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_fidelity import machine  # a script beside this one

COLUMNS = ["TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "tok/s", "remote share", "transfer p50", "GB/s p50"]
SECONDS = {"TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "transfer p50"}  # printed in ms


def cell(column: str, value: float) -> str:
    if np.isnan(value):
        return "-"
    if column in SECONDS:
        return f"{1e3 * value:.1f}"
    return f"{value:,.0f}" if column == "tok/s" else f"{value:.2f}"


def launch(name: str, common: dict[str, Any]) -> Pipeline:
    """``aggregated``: two workers with both roles; a connector's name: one prefill, one decode worker."""
    if name == "aggregated":
        return Pipeline.launch(num_workers=2, **common)
    return Pipeline.launch(prefill_workers=1, decode_workers=1, kv_connector=name, **common)


def one_run(pipeline: Pipeline, work: Workload, rate: float, output_len: int, seed: int) -> dict[str, float]:
    """The workload at ``rate``; its latencies, throughput and transfers."""
    pipeline.clear_trace()
    results, _ = loadgen.open_loop(f"{pipeline.url}/v1", pipeline.model_name, work.prompts, rate, output_len, seed)
    if [r.output_tokens for r in results] != [output_len] * len(results):
        raise RuntimeError(f"a request did not get its {output_len} tokens: {[r.output_tokens for r in results]}")
    trace = pipeline.trace(settle_s=0.5)
    s = trace.summary()
    if s.num_requests != len(results):  # events lost on the way to the recorder: the row would be wrong
        missed, dropped = trace.meta.get("missed"), trace.meta.get("dropped")
        raise RuntimeError(
            f"the trace holds {s.num_requests} of the {len(results)} requests served "
            f"(events missed since launch: {missed}, dropped: {dropped})"
        )
    row = {"TTFT p50": s.ttft_p50_s, "TTFT p99": s.ttft_p99_s, "ITL p50": s.itl_p50_s, "ITL p99": s.itl_p99_s}
    row["tok/s"] = s.output_throughput
    moved = trace.transfers
    if pipeline.config.disaggregated:
        if moved.failed.notna().any():
            raise RuntimeError(f"failed transfers: {moved.failed.dropna().unique()}")
        row["remote share"] = len(moved) / len(results)
        row["transfer p50"] = float(moved.transfer_s.median()) if len(moved) else float("nan")
        row["GB/s p50"] = float(moved.gb_per_s.median()) if len(moved) else float("nan")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipelines", nargs="+", default=["aggregated", "zmq"], help="aggregated and/or connectors")
    parser.add_argument("--rates", nargs="+", type=float, default=[2.0, 6.0, 12.0], help="requests/s")
    parser.add_argument("--num-requests", type=int, default=20, help="at each rate, each round")
    parser.add_argument("--prompt-len", type=int, default=192)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--model", default=None, help="a checkpoint directory or hub id (default: the embedded model)")
    parser.add_argument("--model-shape", choices=sorted(RANDOM_MODEL_SHAPES), help="random weights of this shape")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if there is one)")
    parser.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on a GPU")
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="each worker's (default on a GPU: 4096)")
    parser.add_argument("--out", default=None, help="write the machine, the settings and every run here")
    args = parser.parse_args()
    if args.model and args.model_shape:
        parser.error("--model or --model-shape, not both")
    host = {**machine(args.device), "load_average_before": os.getloadavg()}
    on_gpu = host["gpu"] is not None
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        model = str(make_random_checkpoint(args.model_shape, tmp)) if args.model_shape else args.model
        common = {"model": model, "device": args.device, "dtype": args.dtype, "ports": "auto", "progress": False}
        common["num_kv_blocks"] = args.num_kv_blocks or (4096 if on_gpu else None)
        common = {k: v for k, v in common.items() if v is not None}
        pipelines = {name: stack.enter_context(launch(name, common)) for name in args.pipelines}
        warm = Workload.poisson(4, 100.0, args.prompt_len, args.output_len, seed=99)
        for p in pipelines.values():
            one_run(p, warm, 100.0, args.output_len, 99)
        turn = 0
        for round_ in range(args.rounds):
            for i, rate in enumerate(args.rates):
                seed = round_ * len(args.rates) + i  # new prompts each run: none cached by an earlier one
                work = Workload.poisson(args.num_requests, rate, args.prompt_len, args.output_len, seed=seed)
                order = list(pipelines)[turn % len(pipelines) :] + list(pipelines)[: turn % len(pipelines)]
                turn += 1
                for name in order:
                    row = one_run(pipelines[name], work, rate, args.output_len, seed=seed)
                    runs.append({"pipeline": name, "rate": rate, "round": round_, **row})
                    print({k: round(v, 4) if isinstance(v, float) else v for k, v in runs[-1].items()}, flush=True)
    host["load_average_after"] = os.getloadavg()
    print(f"\n{host}\n")
    frame = pd.DataFrame(runs).reindex(columns=["pipeline", "rate", "round", *COLUMNS])
    medians = (
        frame.groupby(["rate", "pipeline"], sort=False)[COLUMNS].median().sort_index(level="rate", sort_remaining=False)
    )
    print("| rate (req/s) | pipeline | " + " | ".join(f"{c} (ms)" if c in SECONDS else c for c in COLUMNS) + " |")
    print("| --- " * (len(COLUMNS) + 2) + "|")
    for (rate, name), row in medians.iterrows():
        print(f"| {rate:g} | {name} | " + " | ".join(cell(c, v) for c, v in row.items()) + " |")
    if args.out:
        report = {"machine": host, "command": [sys.executable, *sys.argv], "settings": vars(args), "runs": runs}
        Path(args.out).write_text(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()
