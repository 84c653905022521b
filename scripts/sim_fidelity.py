#!/usr/bin/env python
"""How close modkit.sim comes to live runs: fit on one live run, predict others, run them live.

    python scripts/sim_fidelity.py                       # the embedded model on the CPU
    python scripts/sim_fidelity.py --runs 3 --num-requests 60 --rate 5 --out fidelity.json
    python scripts/sim_fidelity.py --cores 2 --out laptop.json            # as on a 2-core laptop
    python scripts/sim_fidelity.py --model-shape qwen2.5-0.5b --device cuda --rate 40 \\
        --num-requests 400 --prompt-len 256 --shared-prefix 128 --output-len 64 --out gpu.json

The default workload is a moderate load for the embedded model on a 2-core CPU: 60 Poisson
requests at 5 a second, 64-token prompts sharing their first 32, 64 output tokens each; the
worker is busy most of the time, with about three requests a step.
NOTE: at a lighter load (32 output tokens, one or two requests a step) half the requests
found the worker idle and half waited for a step in flight, and the p50 of TTFT fell on the
cliff between the two (the 40th percentile 12 ms, the 60th 18 ms); so did ITL's, between
steps of one request and of two. A p50 on a cliff moves by a third when the machine's speed
moves by a tenth: it measured the machine's mood, not the simulator.

A cost model is fitted on one live run of the base configuration; on the CPU with, measured
on this machine, how a step changes with its threads (``modkit.sim.cpu_share``). Then, for each
configuration (another rate, budget, block count, policy, worker count), ``--runs`` live runs
(Poisson workloads of seeds 1, 2, ...) and the simulation of each one's recorded workload
under that configuration. Each pipeline serves one workload (another seed) before its runs, to
warm up; the base configuration's, with ``--settle`` (3% on a GPU by default), as many as it
takes for the machine's speed to hold still: until a run's steps take within that of what a
fit on the run before prices them at (``CostModel.pace``), so that the fit run does not catch
a machine still speeding up (``--most-warm-ups``, 8, at most; the paces go to ``--out``, the
warm-up runs' traces to ``--save-traces``). A drift of a few percent a run in a machine whose
pace moves more than that from run to run gets by it (docs/benchmarks.md, H100 J). On the
CPU every configuration's pipeline is launched first and the runs go round them (seed 1 of
each, then seed 2...), so that a machine whose other load comes and goes weighs on every
configuration alike (an idle pipeline uses about 1% of a core); on a GPU, whose memory each
launch takes most of, one configuration after another. Prints a
markdown table of the medians over the runs: output throughput, TTFT p50, ITL p50,
preemptions and prefix-hit rate, live and simulated, and how far the live runs of each
configuration spread (their range over their median: the machine's own noise); under it, how
many of the TTFT and ITL p50 medians each fit predicted within 10% of the live ones.

More columns split a miss. Each live run is simulated once more with a cost model
fitted on that run itself ("own fit"): what is left of the miss there is the simulator's
(its scheduler, KV cache manager and router are the real ones, so mostly how it times the
hops and the steps); the rest is the cost model's, carried from the fit run to a run of
another configuration, at another time, on a machine whose speed moved in between. Where the
runs go round the pipelines (on the CPU), each is simulated again with a fit on the base
configuration's run of its own round, a minute apart at most ("round's fit"; the base
configuration's runs with the round before's): a cost model carried to another
configuration, on the machine of the same minute, so what it misses beyond the own fit is
what one configuration's steps do not say of another's. And the
share of each live run's steps unlike those the fit was measured on (the median over the
runs; ``modkit.sim.coverage``): where it is large, the fit is extrapolated there. Last, each
live run's pace (``CostModel.pace``: how long its steps, those like the fit's, took against
the fit's prices; +20%: a fifth longer, as on a machine that much slower), and the error of
the fit run's cost model at that pace (``CostModel.scaled``): what is left of a miss once
the machine's speed of that run is known, the fit's shape carried to the other
configuration being all the rest.

``--configs base "another launch" ...`` adds a second pipeline of the base configuration,
launched beside the first: its runs, predicted with the fit run's model, say how far a launch
of the same settings moves the numbers (on the CPU the runs still go round, so it sees the same
minutes as the base configuration's own runs).

``--model``, ``--model-shape`` (random weights with a known model's shapes, made on the spot),
``--device``, ``--dtype`` and ``--max-model-len`` go to every launch. ``--cores N`` confines
this script and every process it starts to N of the cores it may use (CPU affinity, as
``taskset``), so a big host behaves as a small one: a launch gives each worker N / workers
threads, and the six processes share N cores. ``--out`` writes the machine (CPU, cores, GPU,
load average before and after, versions), the settings, the cost model and every run's
summaries as JSON; ``--save-traces DIR`` saves each live run's trace there, and
``--replay DIR`` fits and simulates those again without a live run (the table once more,
from the same live runs, with the simulator as it is now).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modkit import Pipeline, loadgen
from modkit.checks import RANDOM_MODEL_SHAPES, make_random_checkpoint
from modkit.sim import CostModel, CpuShare, Workload, simulate, workload_from_trace
from modkit.trace import Trace
from modkit.trace.summary import TraceSummary

ANOTHER_LAUNCH = "another launch"
# name -> (PipelineConfig overrides, request rate multiplier); those in SMALL_POOL get their
# num_kv_blocks from the workload (small_pool).
CONFIGS: dict[str, tuple[dict[str, Any], float]] = {
    "base": ({}, 1.0),
    # The base configuration again, on a pipeline of its own (only when asked for): what a second
    # launch of the same settings serves at, the floor under every other configuration's miss.
    ANOTHER_LAUNCH: ({}, 1.0),
    "2x rate": ({}, 2.0),
    "budget 64": ({"max_num_batched_tokens": 64}, 1.0),
    "small KV pool": ({}, 1.0),
    # Another policy. Where nothing waits, every policy admits alike: on the small pool requests
    # wait for blocks, and sjf admits new ones before those preempted (more tokens to compute
    # again) and preempts the request with the most tokens still to generate.
    "sjf, small KV pool": ({"scheduling_policy": "sjf"}, 1.0),
    "2 workers": ({"num_workers": 2}, 2.0),
}
SMALL_POOL = ("small KV pool", "sjf, small KV pool")
BLOCK_SIZE = 16  # PipelineConfig's default
WARM_UP_SEED = 1_000  # the workload each pipeline serves once, untraced, before the runs


def small_pool(prompt_len: int, output_len: int, shared_prefix: int) -> int:
    """KV blocks for about three requests at full length: their own blocks, the shared prefix's
    once, the null block and one spare (22 for 64-token prompts sharing 32, and 64 output tokens)."""
    shared = shared_prefix // BLOCK_SIZE
    own = -(-(prompt_len + output_len) // BLOCK_SIZE) - shared
    return 2 + shared + 3 * own


ROUND, PACED = "round's fit", "at its pace"
COLUMNS = ("live", "simulated", "own fit", ROUND, PACED)  # of each configuration's runs (simulate_runs)
UNLIKE = "unlike fit"  # and each live run's share of steps unlike the fit's recording (CostModel.extrapolation)
PACE = "pace"  # and how long its steps took against the fit's prices (CostModel.pace)
PER_RUN = (UNLIKE, PACE)  # the columns of numbers, not summaries
METRICS = ("output_throughput", "ttft_p50_s", "itl_p50_s", "num_preemptions", "prefix_hit_rate")
LATENCIES = ("ttft_p50_s", "itl_p50_s")  # the cells counted against TARGET
TARGET = 0.10  # how close a prediction of a latency's median should come (the simulator's goal)


class IncompleteTrace(RuntimeError):
    """A live run's trace lacks requests it served (events lost on the way to the recorder)."""


def live_run(pipeline: Pipeline, workload: Workload, rate: float, output_len: int, seed: int) -> Trace:
    """Send ``workload``'s prompts at the offsets ``Workload.poisson`` drew for ``seed``; the run's trace."""
    pipeline.clear_trace()
    results, _ = loadgen.open_loop(f"{pipeline.url}/v1", pipeline.model_name, workload.prompts, rate, output_len, seed)
    trace = pipeline.trace(settle_s=0.5)
    if (held := trace.summary().num_requests) != len(results):  # events lost on the way to the recorder
        missed, dropped = trace.meta.get("missed"), trace.meta.get("dropped")
        raise IncompleteTrace(
            f"the trace holds {held} of the {len(results)} requests served (events missed since launch: "
            f"{missed}, dropped: {dropped}, components behind: {trace.meta.get('behind')}): its numbers would be wrong"
        )
    return trace


def settle(run: Callable[[int], Trace], within: float, most: int) -> list[float]:
    """Warm-up runs (``run(seed)``, seeds from ``WARM_UP_SEED``) until the machine's speed holds
    still: until a run's pace against a fit on the run before (``CostModel.pace``) is within
    ``within`` of 1, at most ``most`` runs. The paces, one per run after the first; the last is
    the one that settled, unless there are ``most - 1`` of them and none did.

    NOTE: a GPU machine started a minute before ran its decode steps 2.07, 1.88, 1.71 and then
    1.59 ms apart, four runs of one configuration in a row: a fit on its first run priced every
    step of the later ones 10 to 30% too long. One warm-up was not enough there."""
    paces: list[float] = []
    before: CostModel | None = None
    for k in range(most):
        try:
            trace = run(WARM_UP_SEED + k)
        except IncompleteTrace:  # a run whose events were lost says nothing of the pace
            before = None
            continue
        if before is not None:
            paces.append(before.pace(trace))
            print(f"warm-up {k + 1}: pace {paces[-1]:.3f} against the run before", flush=True)
            if abs(paces[-1] - 1) <= within:
                break
        before = CostModel.fit(trace)
    return paces


def pair(live: dict[str, float], sim: dict[str, float], metric: str, scale: float = 1.0) -> str:
    """``live / simulated (error)`` for one metric."""
    error = (sim[metric] - live[metric]) / live[metric] if live[metric] else 0.0
    return f"{scale * live[metric]:.1f} / {scale * sim[metric]:.1f} ({error:+.0%})"


def spread(runs: list[TraceSummary], metric: str) -> str:
    """How far the runs of one configuration are from each other: the range over the median, in %.
    A prediction cannot be expected to come closer to the median than the runs themselves do."""
    values = [getattr(s, metric) for s in runs]
    median = float(np.median(values))
    return f"{(max(values) - min(values)) / median:.0%}" if median else "-"


def machine(device: str | None) -> dict[str, Any]:
    """What ran it: the CPU, the cores this process may use, the GPU, the versions."""
    names = []
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    on_cuda = (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
    return {
        "cpu": names[0] if names else platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if on_cuda else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "commit": commit.stdout.strip() or None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def confine_to_cores(n: int) -> list[int]:
    """Let this process, and every process it starts, run on only ``n`` of the cores it may use."""
    usable = sorted(os.sched_getaffinity(0))
    if not 1 <= n <= len(usable):
        raise SystemExit(f"--cores must be in [1, {len(usable)}] (the cores this process may use), got {n}")
    os.sched_setaffinity(0, usable[:n])
    torch.set_num_threads(n)
    return usable[:n]


def error(live: dict[str, float], sim: dict[str, float], metric: str) -> str:
    """The simulated value's error, in %."""
    return f"{(sim[metric] - live[metric]) / live[metric]:+.0%}" if live[metric] else "-"


def simulate_runs(
    trace: Trace, cost: CostModel, share: CpuShare | None, overrides: dict[str, Any], nearby: CostModel | None
) -> tuple[dict[str, TraceSummary], CostModel, float | None]:
    """``trace``'s workload simulated under ``overrides`` with ``cost`` ("simulated"), with a cost
    model fitted on ``trace`` itself ("own fit"), with ``nearby`` (if given: the fit on the base
    configuration's run of the same round, "round's fit"), and with ``cost`` at ``trace``'s
    pace ("at its pace", ``CostModel.pace``); the own fit and the pace (None: no step of the
    trace is like the fit's)."""
    workload = workload_from_trace(trace)
    own = CostModel.fit(trace, cpu_share=share)
    summaries = {
        "simulated": simulate(workload, cost, **overrides).summary(),
        "own fit": simulate(workload, own, **overrides).summary(),
    }
    if nearby is not None:
        summaries[ROUND] = simulate(workload, nearby, **overrides).summary()
    try:
        pace = cost.pace(trace)
    except ValueError:  # no step of the trace is like the fit's
        return summaries, own, None
    summaries[PACED] = simulate(workload, cost.scaled(pace), **overrides).summary()
    return summaries, own, pace


def nearby_fit(round_fits: dict[int, CostModel], name: str, seed: int) -> CostModel | None:
    """The fit on the base configuration's run of round ``seed`` (the base configuration's own
    runs: of the round before, seed 0 being the fit run), if that run was served."""
    return round_fits.get(seed - 1 if name == "base" else seed)


def unlike(cost: CostModel, trace: Trace) -> float:
    """The share of ``trace``'s steps unlike those ``cost`` was fitted on (``modkit.sim.coverage``)."""
    beyond = cost.extrapolation(trace)
    assert beyond is not None, "a fitted cost model knows its recording"
    return beyond.outside


def plain(values: list[Any]) -> list[Any]:
    """A column of ``rows`` as JSON values: each summary as a dict (the shares are floats already)."""
    return [v.to_dict() if isinstance(v, TraceSummary) else v for v in values]


def print_table(rows: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """The markdown table of each configuration's medians, live and simulated; the medians."""
    print(
        "| configuration | tok/s live / sim | TTFT p50 ms live / sim | ITL p50 ms live / sim | preemptions | hits "
        "| live runs' spread, TTFT / ITL | own fit's error, TTFT / ITL | round's fit's error, TTFT / ITL "
        "| live steps unlike the fit's | live steps' pace | error at that pace, TTFT / ITL |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for name, runs in rows.items():
        if not runs["live"]:
            print(f"| {name} | every run skipped | | | | | | | | | | |")
            continue
        live = {m: float(np.median([getattr(s, m) for s in runs["live"]])) for m in METRICS}
        sim = {m: float(np.median([getattr(s, m) for s in runs["simulated"]])) for m in METRICS}
        own = {m: float(np.median([getattr(s, m) for s in runs["own fit"]])) for m in METRICS}
        medians[name] = {"live": live, "simulated": sim, "own fit": own}
        others = {}
        for column in (ROUND, PACED):
            others[column] = "- / -"
            if runs[column]:
                medians[name][column] = {m: float(np.median([getattr(s, m) for s in runs[column]])) for m in METRICS}
                others[column] = " / ".join(error(live, medians[name][column], m) for m in LATENCIES)
        paces = [p for p in runs[PACE] if p is not None]
        pace = f"{np.median(paces) - 1:+.0%}" if paces else "-"
        print(
            f"| {name} | {pair(live, sim, 'output_throughput')} | {pair(live, sim, 'ttft_p50_s', 1e3)} "
            f"| {pair(live, sim, 'itl_p50_s', 1e3)} | {live['num_preemptions']:.0f} / {sim['num_preemptions']:.0f} "
            f"| {live['prefix_hit_rate']:.2f} / {sim['prefix_hit_rate']:.2f} "
            f"| {spread(runs['live'], 'ttft_p50_s')} / {spread(runs['live'], 'itl_p50_s')} "
            f"| {error(live, own, 'ttft_p50_s')} / {error(live, own, 'itl_p50_s')} | {others[ROUND]} "
            f"| {np.median(runs[UNLIKE]):.0%} | {pace} | {others[PACED]} |"
        )
    print()
    fits = {
        "simulated": "the fit run's fit",
        "own fit": "each run's own fit",
        ROUND: "the round's fit",
        PACED: "the fit run's fit at each run's pace",
    }
    for column, label in fits.items():
        errors = [
            abs(m[column][metric] - m["live"][metric]) / m["live"][metric]
            for m in medians.values()
            if column in m
            for metric in LATENCIES
            if m["live"][metric]
        ]
        if errors:
            within = sum(e <= TARGET for e in errors)
            print(f"with {label}: {within} of {len(errors)} latency medians within {TARGET:.0%} of the live ones")
    return medians


def replay(directory: Path, names: list[str]) -> dict[str, dict[str, list[Any]]]:
    """Fit on ``base-seed0`` of the traces ``--save-traces`` left in ``directory`` (with the
    timings of the ``cpu_share.json`` measured then, if there is one, their parallel fractions
    worked out again) and simulate every other one again, with that fit and with its own."""
    share_file = directory / "cpu_share.json"
    saved = json.loads(share_file.read_text()) if share_file.exists() else None
    share = CpuShare.from_timings(saved["cores"], saved["measured"]) if saved else None  # with today's rule
    fit_run = Trace.load(directory / "base-seed0.json.gz")
    cost = CostModel.fit(fit_run, cpu_share=share)
    print(cost, share, flush=True)
    round_fits: dict[int, CostModel] = {}  # on the CPU the runs went round: each round's base run
    if fit_run.meta.get("device") == "cpu":
        for path in directory.glob("base-seed*.json.gz"):
            round_fits[seed_of(path)] = CostModel.fit(Trace.load(path), cpu_share=share)
    rows: dict[str, dict[str, list[Any]]] = {}
    for name in names:
        for path in sorted(directory.glob(f"{file_stem(name)}-seed*.json.gz")):
            if path.name == "base-seed0.json.gz":
                continue
            trace = Trace.load(path)
            overrides = CONFIGS[name][0]
            if name in SMALL_POOL:
                overrides = {**overrides, "num_kv_blocks": trace.meta["num_blocks"][0]}
            runs = rows.setdefault(name, {column: [] for column in (*COLUMNS, *PER_RUN)})
            runs["live"].append(trace.summary())
            runs[UNLIKE].append(unlike(cost, trace))
            nearby = nearby_fit(round_fits, name, seed_of(path))
            summaries, _, pace = simulate_runs(trace, cost, share, overrides, nearby)
            for column, summary in summaries.items():
                runs[column].append(summary)
            runs[PACE].append(pace)
    return rows


def file_stem(name: str) -> str:
    """A configuration's name as its saved traces start (``sjf, small KV pool``: ``sjf_small_KV_pool``)."""
    return name.replace(",", "").replace(" ", "_")


def seed_of(path: Path) -> int:
    """The seed in a saved trace's name (``base-seed2.json.gz``: 2)."""
    return int(path.name.split("-seed")[1].split(".")[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=60)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--shared-prefix", type=int, default=32)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=None,
        choices=list(CONFIGS),
        help=f"default: all but {ANOTHER_LAUNCH!r} (with --replay: every one whose traces are there)",
    )
    launch = parser.add_argument_group("every launch")
    launch.add_argument("--model", default=None, help="a checkpoint directory or hub id (default: the embedded model)")
    launch.add_argument("--model-shape", choices=sorted(RANDOM_MODEL_SHAPES), help="random weights of this shape")
    launch.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if there is one)")
    launch.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on a GPU")
    launch.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    launch.add_argument("--cores", type=int, default=None, help="run on this many of the usable cores (affinity)")
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        metavar="FRACTION",
        help="before the fit run, warm up until a run's pace against the run before is within this of 1 "
        "(default: 0.03 on a GPU; on the CPU one warm-up run, as every other pipeline gets)",
    )
    parser.add_argument("--most-warm-ups", type=int, default=8, help="at most this many warm-up runs to settle")
    parser.add_argument("--out", default=None, help="write the machine, the cost model and every run's summaries here")
    parser.add_argument("--save-traces", default=None, help="save each live run's trace in this directory")
    parser.add_argument("--replay", default=None, help="no live run: fit and simulate the traces saved here")
    args = parser.parse_args()
    if args.model and args.model_shape:
        parser.error("--model or --model-shape, not both")
    if args.replay:
        asked = args.configs or list(CONFIGS)  # replay looks for each one's traces, and skips those not there
        print_table(replay(Path(args.replay), ["base", *[c for c in asked if c != "base"]]))
        return
    args.configs = args.configs or [c for c in CONFIGS if c != ANOTHER_LAUNCH]
    host = {**machine(args.device), "load_average_before": os.getloadavg()}
    host["cores_used"] = confine_to_cores(args.cores) if args.cores else None
    if args.settle is None and host["gpu"] is not None:
        args.settle = 0.03
    if args.settle is not None and not 0 < args.settle < 1:
        parser.error(f"--settle is a fraction between 0 and 1, got {args.settle}")
    if args.most_warm_ups < 2:
        parser.error(f"--most-warm-ups must be at least 2 (a pace compares two runs), got {args.most_warm_ups}")

    def workload(seed: int, rate: float) -> Workload:
        return Workload.poisson(
            args.num_requests, rate, args.prompt_len, args.output_len, seed, shared_prefix=args.shared_prefix
        )

    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_random_checkpoint(args.model_shape, tmp)) if args.model_shape else args.model
        common = {"model": model, "device": args.device, "dtype": args.dtype, "max_model_len": args.max_model_len}
        common = {k: v for k, v in common.items() if v is not None}
        names = ["base", *[c for c in args.configs if c != "base"]]
        settings: dict[str, dict[str, Any]] = {}
        overrides: dict[str, dict[str, Any]] = {}
        for name in names:
            overrides[name] = CONFIGS[name][0]
            if name in SMALL_POOL:
                pool = small_pool(args.prompt_len, args.output_len, args.shared_prefix)
                overrides[name] = {**overrides[name], "num_kv_blocks": pool}
            settings[name] = {**common, **overrides[name]}
            if "max_model_len" in common and "num_kv_blocks" in overrides[name]:  # no longer than the pool holds
                pool = overrides[name]["num_kv_blocks"]
                settings[name]["max_model_len"] = min(common["max_model_len"], BLOCK_SIZE * (pool - 1))
        # On the CPU every configuration's pipeline is up at once and each round of runs goes
        # through them all, so that each sees the machine of the same minutes (another user's
        # load comes and goes). On a GPU each launch takes most of the card: one at a time.
        together = host["gpu"] is None
        seeds = range(args.runs + 1)
        order = [(s, n) for s in seeds for n in names] if together else [(s, n) for n in names for s in seeds]
        rows: dict[str, dict[str, list[Any]]] = {n: {c: [] for c in (*COLUMNS, *PER_RUN)} for n in names}
        cost: CostModel | None = None
        share: CpuShare | None = None
        round_fits: dict[int, CostModel] = {}  # seed -> the fit on that round's base run (runs that go round)
        skipped: list[str] = []  # runs whose traces lost events
        with contextlib.ExitStack() as stack:

            def up(name: str) -> Pipeline:
                pipeline = stack.enter_context(Pipeline.launch(ports="auto", seed=0, progress=False, **settings[name]))
                # NOTE: a fresh pipeline's first requests are slow (on an H200, the first prompts of a launch
                # reached the scheduler up to 125 ms late), and a fit on them prices every step as the first.
                rate = args.rate * CONFIGS[name][1]
                if name == "base" and args.settle is not None:  # the fit run's pipeline: until the machine settles

                    def warm_up_run(seed: int) -> Trace:
                        trace = live_run(pipeline, workload(seed, rate), rate, args.output_len, seed)
                        if args.save_traces:  # beside the runs, under a name no configuration has
                            Path(args.save_traces).mkdir(parents=True, exist_ok=True)
                            trace.save(Path(args.save_traces, f"warm-up-seed{seed}.json.gz"))
                        return trace

                    host["settle_paces"] = settle(warm_up_run, args.settle, args.most_warm_ups)
                else:
                    warm_up = workload(WARM_UP_SEED, rate)
                    loadgen.open_loop(
                        f"{pipeline.url}/v1", pipeline.model_name, warm_up.prompts, rate, args.output_len, 0
                    )
                return pipeline

            pipelines = {n: up(n) for n in names} if together else {}
            for seed, name in order:
                if seed == 0 and name != "base":
                    continue  # seed 0 is the run the cost model is fitted on, not one of those predicted
                if name not in pipelines:  # one at a time: the one before goes first
                    for other in list(pipelines):
                        pipelines.pop(other).shutdown()
                    pipelines[name] = up(name)
                rate = args.rate * CONFIGS[name][1]
                try:
                    trace = live_run(pipelines[name], workload(seed, rate), rate, args.output_len, seed)
                except IncompleteTrace as error:
                    if seed == 0:
                        raise  # no fit, nothing to predict with
                    skipped.append(f"{name}, seed {seed}: {error}")
                    print("skipped:", skipped[-1], flush=True)
                    continue
                if args.save_traces:
                    Path(args.save_traces).mkdir(parents=True, exist_ok=True)
                    trace.save(Path(args.save_traces, f"{file_stem(name)}-seed{seed}.json.gz"))
                if seed == 0:
                    share = None if host["gpu"] else CpuShare.measure(model, args.dtype)  # on a GPU: not needed
                    cost = CostModel.fit(trace, cpu_share=share)
                    if together:
                        round_fits[0] = cost
                    if args.save_traces and share is not None:
                        share_file = Path(args.save_traces, "cpu_share.json")
                        share_file.write_text(json.dumps(dataclasses.asdict(share)))
                    print(cost, share, flush=True)
                    continue
                assert cost is not None
                runs = rows[name]
                runs["live"].append(trace.summary())
                runs[UNLIKE].append(unlike(cost, trace))
                nearby = nearby_fit(round_fits, name, seed)
                summaries, own, pace = simulate_runs(trace, cost, share, overrides[name], nearby)
                runs[PACE].append(pace)
                for column, summary in summaries.items():
                    runs[column].append(summary)
                if together and name == "base":
                    round_fits[seed] = own
                print(
                    name, overrides[name], seed, runs["live"][-1].to_dict(), runs["simulated"][-1].to_dict(), flush=True
                )
                print(f"pace of the fit's prices: {pace if pace is None else round(pace, 3)}", flush=True)
        rows = {n: r for n, r in rows.items() if n in args.configs}

    host["load_average_after"] = os.getloadavg()
    print(f"\n{host}\n")
    medians = print_table(rows)
    if args.out:
        report = {
            "machine": host,
            "command": [sys.executable, *sys.argv],
            "settings": vars(args),
            "cost_model": cost.describe() if cost else None,
            "medians": medians,
            "skipped": skipped,
            "runs": {
                n: {k: v if k in PER_RUN else [s.to_dict() for s in v] for k, v in r.items()} for n, r in rows.items()
            },
        }
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
