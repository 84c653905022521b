"""``handoffs``: requests moving between workers (disaggregated prefill and decode).

One lane per worker, time across. Within its lane a request's steps are short bars in its
color (the same color as in every other view): its prompt on a prefill worker, then its
tokens on a decode worker. An arrow joins the two, from the start to the end of the read
of its KV blocks (``Trace.transfers``), so the gap a learner sees between the last prompt
step and the first decode step is the transfer itself. A read that failed is a red dashed
arrow: the decode worker computed those tokens itself (nothing was lost, time was).

Requests take sub-rows of their lane in turn (``rows`` of them), so that the bars of
requests running together do not hide each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.figure import Figure

from modkit.trace import Trace
from modkit.viz.blocks import color_of, new_axes, no_data, request_colors

FAILED_COLOR = "tab:red"
LANE_COLORS = {"prefill": "#fdf1e3", "decode": "#e8f0fa", "both": "0.96"}  # light: the bars carry the color


def handoffs(trace: Trace, ax: Axes | None = None, max_requests: int = 30, rows: int = 6) -> Figure:
    """Each worker a lane; each request's steps in its lane, and its KV transfer as an arrow.

    Gids: "steps" (the bars, one ``PolyCollection``), "transfer" and "failed" (the arrows, one
    ``LineCollection`` each). Shows the latest ``max_requests`` requests that were scheduled.
    """
    if max_requests < 1 or rows < 1:
        raise ValueError(f"max_requests and rows must be >= 1, got {max_requests} and {rows}")
    figure, ax = new_axes(ax, (10.0, 4.5))
    scheduled = trace.scheduled
    scheduled = scheduled[scheduled["kind"] != "preempted"]
    if not len(scheduled):
        no_data(ax, "no steps yet")
        return figure
    req_ids = list(dict.fromkeys(scheduled.sort_values("start", kind="stable")["req_id"]))[-max_requests:]
    sub_row = {req_id: i % rows for i, req_id in enumerate(req_ids)}
    num_workers = int(trace.meta.get("num_workers") or scheduled["worker_id"].max() + 1)
    roles = _roles(trace.meta, num_workers)
    colors = request_colors(trace)

    def y(worker_id: Any, req_id: str) -> float:  # the lane's top is worker_id - 0.4, its bottom + 0.4
        return float(worker_id) - 0.4 + 0.8 * (sub_row[req_id] + 0.5) / rows

    for w, role in enumerate(roles):
        ax.axhspan(w - 0.45, w + 0.45, color=LANE_COLORS[role], zorder=0)
    steps = scheduled[scheduled["req_id"].isin(req_ids)]
    half = 0.4 * 0.8 / rows
    ys = [y(w, r) for w, r in zip(steps["worker_id"], steps["req_id"], strict=True)]
    boxes = [
        [(s, yy - half), (s, yy + half), (e, yy + half), (e, yy - half)]
        for s, e, yy in zip(steps["start"], steps["end"], ys, strict=True)
    ]
    bars = PolyCollection(boxes, facecolors=[color_of(colors, r) for r in steps["req_id"]], linewidths=0, gid="steps")
    ax.add_collection(bars)
    transfers = trace.transfers
    transfers = transfers[transfers["req_id"].isin(req_ids)]
    for failed, gid in ((False, "transfer"), (True, "failed")):
        part = transfers[transfers["failed"].notna() == failed]
        segments = [
            [(t.start, y(t.src_worker_id, t.req_id)), (t.end, y(t.dst_worker_id, t.req_id))] for t in part.itertuples()
        ]
        lines = LineCollection(
            segments,
            colors=FAILED_COLOR if failed else [color_of(colors, r) for r in part["req_id"]],
            linestyles="--" if failed else "-",
            linewidths=1.5,
            gid=gid,
            zorder=3,
        )
        ax.add_collection(lines)
        ax.scatter(
            [s[1][0] for s in segments],
            [s[1][1] for s in segments],
            marker="v" if not failed else "x",
            s=18,
            c=FAILED_COLOR if failed else "0.25",
            zorder=4,
            label=_legend(part, failed),
        )
    ax.set_yticks(range(num_workers), [f"worker {w}\n({role})" for w, role in enumerate(roles)])
    ax.set_ylim(num_workers - 0.5, -0.5)
    first, last = float(steps["start"].min()), float(steps["end"].max())
    ax.set_xlim(first - 0.01 * (last - first), last + 0.01 * (last - first) + 1e-3)
    ax.set_xlabel("time (s)")
    ax.set_title(f"requests moving between workers (latest {len(req_ids)}; a bar is a step, an arrow a KV transfer)")
    ax.legend(loc="upper right", fontsize=8)
    return figure


def _roles(meta: dict[str, Any], num_workers: int) -> list[str]:
    """Each worker's role, as the launch recorded it: the first ``prefill_workers`` compute prompts."""
    num_prefill = int(meta.get("prefill_workers") or 0)
    if not num_prefill:
        return ["both"] * num_workers
    return ["prefill" if w < num_prefill else "decode" for w in range(num_workers)]


def _legend(transfers: Any, failed: bool) -> str:
    if failed:
        return f"read failed, computed on decode ({len(transfers)})"
    if not len(transfers):
        return "KV transfer (none)"
    mb = transfers["num_bytes"].sum() / 1e6
    ms = 1e3 * float(np.median(transfers["transfer_s"]))
    return f"KV transfer ({len(transfers)}, {mb:.2f} MB, median {ms:.1f} ms)"
