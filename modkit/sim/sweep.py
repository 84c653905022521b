"""``capacity_sweep``: what each configuration sustains, rate by rate, simulated.

::

    frame = capacity_sweep(
        lambda rate: Workload.poisson(500, rate, prompt_len=64, output_len=32, seed=0),
        cost, rates=[2, 4, 8, 16, 32],
        configs={"fcfs": {}, "sjf": {"scheduling_policy": "sjf"}, "2 workers": {"num_workers": 2}},
    )
    frame                   # one row per configuration and rate: the summary's numbers
    knees(frame)            # per configuration: where it stops keeping up (loadgen.knee), or None
    viz.capacity(frame)     # TTFT p99 against the offered rate, a line per configuration, its knee marked

Each point is one simulation, so a sweep of dozens of points takes seconds. The knee is
``modkit.loadgen.knee``'s, the one notebook 07 finds in live runs: the most requests per
second a configuration completed, once it completed less than 80% of what was offered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from modkit.loadgen import knee
from modkit.sim.cost_model import CostModel
from modkit.sim.simulate import simulate
from modkit.sim.workload import Workload

if TYPE_CHECKING:
    import pandas as pd


def capacity_sweep(
    workload_at: Callable[[float], Workload],
    cost_model: CostModel,
    rates: Iterable[float],
    configs: Mapping[str, Mapping[str, Any]],
) -> pd.DataFrame:
    """Simulate ``workload_at(rate)`` at each rate under each configuration (PipelineConfig overrides).

    One row per (configuration, rate): ``config``, ``request_rate``, ``request_throughput``
    (requests completed per second, first arrival to last token), every ``TraceSummary`` field,
    and ``outside_fit``: the share of its steps unlike those the cost model was fitted on
    (``modkit.sim.coverage``; None for a model fitted on no recording, such as a roofline).
    """
    import pandas as pd

    rows = []
    for name, overrides in configs.items():
        for rate in rates:
            trace = simulate(workload_at(rate), cost_model, **overrides)
            summary, beyond = trace.summary(), trace.meta["extrapolation"]
            throughput = summary.num_requests / summary.duration_s if summary.duration_s > 0 else 0.0
            row = {"config": name, "request_rate": rate, "request_throughput": throughput, **summary.to_dict()}
            rows.append(row | {"outside_fit": None if beyond is None else beyond["outside"]})
    return pd.DataFrame(rows)


def knees(frame: pd.DataFrame, keep_up: float = 0.8) -> dict[str, float | None]:
    """Per configuration of ``capacity_sweep``'s frame: its knee in requests/s, None if it kept up at every rate."""
    return {str(name): knee(group.to_dict("records"), keep_up) for name, group in frame.groupby("config", sort=False)}
