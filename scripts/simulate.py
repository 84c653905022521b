#!/usr/bin/env python
"""What-if on a recorded run, or on made-up traffic: modkit.sim from the command line.

    python scripts/simulate.py run.json.gz                              # the run again, its own settings
    python scripts/simulate.py run.json.gz --set num_kv_blocks=64 --set scheduling_policy=sjf
    python scripts/simulate.py --cost-from run.json.gz --poisson 1000 --rate 8 --prompt-len 64 --output-len 32
    python scripts/simulate.py --roofline qwen2.5-0.5b --gpu H100 --poisson 500 --rate 40 --prompt-len 256
    python scripts/simulate.py --cost-from run.json.gz --poisson 500 --sweep 2 4 8 16 32 \
        --compare "sjf: scheduling_policy=sjf" --compare "2 workers: num_workers=2" --figure capacity.png

A trace in (``Pipeline.trace().save``, ``scripts/start_all.py --save-trace``) is replayed: its
requests, arrivals and output lengths, with a cost model fitted on its steps (or on
``--cost-from``'s). ``--poisson N`` serves made-up traffic instead. ``--set FIELD=VALUE``
changes a PipelineConfig field (repeatable); ``--price 1.2`` makes every step 1.2 times as
long (``CostModel.scaled``: the same machine 20% slower, or, below 1, faster). Prints the
cost model and the summary (beside the recorded run's, for a trace in), how many of the
simulated steps lie beyond those the cost model was fitted on, and saves the simulated trace
(``--out``).

``--sweep RATE ...`` is a capacity sweep instead (``modkit.sim.capacity_sweep``): the Poisson
traffic at each rate, under the ``--set`` settings and under each ``--compare "NAME:
FIELD=VALUE, ..."`` (those settings on top of them); it prints TTFT p99 and the requests
completed per second at each rate, and each configuration's knee, the rate where it stops
keeping up, and the share of each point's steps unlike any the cost model was fitted on
("unlike fit": there the answer rests on extrapolation; ``modkit.sim.coverage``);
``--figure`` draws TTFT p99 against the rate, the knees dashed; ``--out`` gets the table as
JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from modkit.checks import RANDOM_MODEL_SHAPES
from modkit.config import ConfigError
from modkit.model.config import ModelConfig
from modkit.sim import GPUS, CostModel, Extrapolation, Workload, capacity_sweep, knees, simulate, workload_from_trace
from modkit.trace import Trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", nargs="?", help="a saved trace to replay")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a PipelineConfig field")
    parser.add_argument("--out", default="simulated.json.gz", help="where to save the simulated trace")
    cost = parser.add_argument_group("the cost model (default: fitted on the trace replayed)")
    cost.add_argument("--cost-from", metavar="TRACE", help="fit it on this trace instead")
    cost.add_argument("--roofline", choices=sorted(RANDOM_MODEL_SHAPES), help="from FLOPs and bytes of a model shape")
    cost.add_argument("--gpu", default="H100", choices=sorted(GPUS))
    cost.add_argument(
        "--price", type=float, default=1.0, metavar="FACTOR", help="each step FACTOR times as long: a slower machine"
    )
    traffic = parser.add_argument_group("made-up traffic instead of a trace (Workload.poisson)")
    traffic.add_argument("--poisson", type=int, metavar="N", help="N requests, Poisson arrivals")
    traffic.add_argument("--rate", type=float, default=8.0, help="requests per second")
    traffic.add_argument("--prompt-len", type=int, default=64)
    traffic.add_argument("--output-len", type=int, default=32)
    traffic.add_argument("--shared-prefix", type=int, default=0, help="leading prompt tokens all requests share")
    traffic.add_argument("--seed", type=int, default=0)
    sweep = parser.add_argument_group("a capacity sweep of the made-up traffic (modkit.sim.capacity_sweep)")
    sweep.add_argument("--sweep", type=float, nargs="+", metavar="RATE", help="requests per second, each simulated")
    sweep.add_argument("--compare", action="append", default=[], metavar="NAME: FIELD=VALUE, ...")
    sweep.add_argument("--figure", default=None, help="where to save TTFT p99 against the rate (.png)")
    args = parser.parse_args()
    if args.sweep:
        run_sweep(args, parser)
        return
    if (args.trace is None) == (args.poisson is None):
        parser.error("give a trace to replay or --poisson N, one of the two")

    recorded = Trace.load(args.trace) if args.trace else None
    workload = (
        workload_from_trace(recorded)
        if recorded is not None
        else Workload.poisson(
            args.poisson, args.rate, args.prompt_len, args.output_len, args.seed, shared_prefix=args.shared_prefix
        )
    )
    cost_model = pick_cost_model(args, recorded, parser)
    overrides = dict(parse_setting(s, parser) for s in args.set)

    started = time.perf_counter()
    try:
        simulated = simulate(workload, cost_model, **overrides)
    except ConfigError as error:
        parser.error(str(error))
    wall = time.perf_counter() - started
    simulated.save(args.out)

    print(cost_model)
    print(f"{workload}, settings {workload.config | overrides}")
    if recorded is not None:
        print(f"\nrecorded:\n{recorded.summary()}")
    summary = simulated.summary()
    print(f"\nsimulated:\n{summary}")
    if (beyond := simulated.meta["extrapolation"]) is not None:  # simulate() measured it
        print(f"beyond the fit's recording: {Extrapolation(**beyond)}")
    print(f"\n{summary.duration_s:.1f} simulated seconds in {wall:.2f} s; trace saved to {args.out}")


def run_sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The capacity sweep: a table, the knees, and optionally the figure and the table as JSON."""
    if args.poisson is None or args.trace is not None:
        parser.error("--sweep simulates made-up traffic: give --poisson N (and --cost-from or --roofline)")
    cost_model = pick_cost_model(args, None, parser)
    base = dict(parse_setting(s, parser) for s in args.set)
    configs = {"as set" if base else "default": base}
    for spec in args.compare:
        name, colon, settings = spec.partition(":")
        if not colon or not name.strip():
            parser.error(f'--compare takes "NAME: FIELD=VALUE, ...", got {spec!r}')
        extra = dict(parse_setting(s.strip(), parser) for s in settings.split(",") if s.strip())
        configs[name.strip()] = base | extra

    def workload_at(rate: float) -> Workload:
        return Workload.poisson(
            args.poisson, rate, args.prompt_len, args.output_len, args.seed, shared_prefix=args.shared_prefix
        )

    started = time.perf_counter()
    try:
        frame = capacity_sweep(workload_at, cost_model, args.sweep, configs)
    except ConfigError as error:
        parser.error(str(error))
    wall = time.perf_counter() - started
    at_knee = knees(frame)
    print(cost_model)
    print(f"{len(frame)} simulations of {args.poisson} requests in {wall:.2f} s\n")
    print(f"{'configuration':<20}{'rate':>8}{'done/s':>9}{'TTFT p99 ms':>13}{'ITL p50 ms':>12}{'unlike fit':>12}")
    for row in frame.itertuples():
        outside = "-" if pd.isna(row.outside_fit) else f"{row.outside_fit:.0%}"
        print(
            f"{row.config:<20}{row.request_rate:>8g}{row.request_throughput:>9.1f}"
            f"{1e3 * row.ttft_p99_s:>13.1f}{1e3 * row.itl_p50_s:>12.2f}{outside:>12}"
        )
    for name, rate in at_knee.items():
        print(f"knee of {name}: " + (f"{rate:.1f} requests/s" if rate is not None else "none (kept up at every rate)"))
    if args.figure:
        from modkit import viz

        viz.capacity(frame).savefig(args.figure, dpi=120, bbox_inches="tight")
        print(f"figure saved to {args.figure}")
    report = {"configs": configs, "rates": args.sweep, "knees": at_knee, "rows": frame.to_dict("records")}
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"table saved to {args.out}")


def pick_cost_model(args: argparse.Namespace, recorded: Trace | None, parser: argparse.ArgumentParser) -> CostModel:
    if not args.price > 0:
        parser.error(f"--price is a factor on each step's time, above 0; got {args.price}")
    if args.roofline:
        family, fields = RANDOM_MODEL_SHAPES[args.roofline]
        config = ModelConfig.from_hf_dict({"architectures": [f"{family}ForCausalLM"], **fields})
        cost_model = CostModel.roofline(config, args.gpu)
    else:
        source = Trace.load(args.cost_from) if args.cost_from else recorded
        if source is None:
            parser.error("made-up traffic needs a cost model: --cost-from TRACE or --roofline SHAPE")
        cost_model = CostModel.fit(source)
    return cost_model if args.price == 1 else cost_model.scaled(args.price)


def parse_setting(setting: str, parser: argparse.ArgumentParser) -> tuple[str, Any]:
    """``FIELD=VALUE``, the value read as YAML (so 64 is an int, true a bool, sjf a string)."""
    name, equals, value = setting.partition("=")
    if not equals or not name:
        parser.error(f"--set takes FIELD=VALUE, got {setting!r}")
    return name, yaml.safe_load(value)


if __name__ == "__main__":
    main()
