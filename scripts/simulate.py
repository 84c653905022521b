#!/usr/bin/env python
"""What-if on a recorded run, or on made-up traffic: modkit.sim from the command line.

    python scripts/simulate.py run.json.gz                              # the run again, its own settings
    python scripts/simulate.py run.json.gz --set num_kv_blocks=64 --set scheduling_policy=sjf
    python scripts/simulate.py --cost-from run.json.gz --poisson 1000 --rate 8 --prompt-len 64 --output-len 32
    python scripts/simulate.py --roofline qwen2.5-0.5b --gpu H100 --poisson 500 --rate 40 --prompt-len 256

A trace in (``Pipeline.trace().save``, ``scripts/start_all.py --save-trace``) is replayed: its
requests, arrivals and output lengths, with a cost model fitted on its steps (or on
``--cost-from``'s). ``--poisson N`` serves made-up traffic instead. ``--set FIELD=VALUE``
changes a PipelineConfig field (repeatable). Prints the cost model and the summary (beside
the recorded run's, for a trace in) and saves the simulated trace (``--out``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import yaml

from modkit.checks import RANDOM_MODEL_SHAPES
from modkit.config import ConfigError
from modkit.model.config import ModelConfig
from modkit.sim import GPUS, CostModel, Workload, simulate, workload_from_trace
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
    traffic = parser.add_argument_group("made-up traffic instead of a trace (Workload.poisson)")
    traffic.add_argument("--poisson", type=int, metavar="N", help="N requests, Poisson arrivals")
    traffic.add_argument("--rate", type=float, default=8.0, help="requests per second")
    traffic.add_argument("--prompt-len", type=int, default=64)
    traffic.add_argument("--output-len", type=int, default=32)
    traffic.add_argument("--shared-prefix", type=int, default=0, help="leading prompt tokens all requests share")
    traffic.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
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
    print(f"\n{summary.duration_s:.1f} simulated seconds in {wall:.2f} s; trace saved to {args.out}")


def pick_cost_model(args: argparse.Namespace, recorded: Trace | None, parser: argparse.ArgumentParser) -> CostModel:
    if args.roofline:
        family, fields = RANDOM_MODEL_SHAPES[args.roofline]
        config = ModelConfig.from_hf_dict({"architectures": [f"{family}ForCausalLM"], **fields})
        return CostModel.roofline(config, args.gpu)
    source = Trace.load(args.cost_from) if args.cost_from else recorded
    if source is None:
        parser.error("made-up traffic needs a cost model: --cost-from TRACE or --roofline SHAPE")
    return CostModel.fit(source)


def parse_setting(setting: str, parser: argparse.ArgumentParser) -> tuple[str, Any]:
    """``FIELD=VALUE``, the value read as YAML (so 64 is an int, true a bool, sjf a string)."""
    name, equals, value = setting.partition("=")
    if not equals or not name:
        parser.error(f"--set takes FIELD=VALUE, got {setting!r}")
    return name, yaml.safe_load(value)


if __name__ == "__main__":
    main()
