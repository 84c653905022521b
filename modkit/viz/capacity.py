"""``capacity``: latency against offered load for several configurations, each knee marked.

Draws a ``modkit.sim.capacity_sweep`` frame (or any frame with ``config``, ``request_rate``,
``request_throughput`` and the metric): one line per configuration, and a dashed vertical
line (gid ``knee-<config>``) where it stops keeping up with the offered rate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from modkit.viz.blocks import new_axes

if TYPE_CHECKING:
    import pandas as pd


def capacity(frame: pd.DataFrame, metric: str = "ttft_p99_s", ax: Axes | None = None) -> Figure:
    """``metric`` (seconds, shown in ms on a log scale) against ``request_rate``, a line per configuration."""
    from modkit.sim.sweep import knees

    figure, ax = new_axes(ax, (7.0, 4.0))
    at_knee = knees(frame) if len(frame) else {}
    for name, group in frame.groupby("config", sort=False):
        group = group.sort_values("request_rate")
        (line,) = ax.plot(group["request_rate"], 1e3 * group[metric], marker="o", label=str(name), gid=f"line-{name}")
        rate = at_knee.get(str(name))
        if rate is not None:
            ax.axvline(rate, color=line.get_color(), linestyle="--", alpha=0.7, gid=f"knee-{name}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (requests/s)")
    label = metric.removesuffix("_s").replace("_", " ").replace("ttft", "TTFT").replace("itl", "ITL")
    ax.set_ylabel(f"{label} (ms)")
    ax.set_title("capacity: dashed, where each configuration stops keeping up")
    if len(frame):
        ax.legend()
    return figure
