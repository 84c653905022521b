"""Views of a trace over time, and a dashboard of every view.

- ``timeline``: each request's life. It waits in the queue (gray), its prompt is
  computed in chunks (orange: chunked prefill, at most ``max_num_batched_tokens`` a step,
  shared with everyone else's decodes), then it decodes one token a step (blue). A red
  cross is a preemption: the pool ran out of blocks, the request lost its own and waits
  again, then recomputes its prompt *and* the tokens it had already generated.
- ``batch_composition``: a step is one batch of prompt tokens and decode tokens under one
  token budget. Running requests go first (their decodes and the rest of their prompts),
  new prompts fill what is left: the more requests decode, the slower prompts get in,
  which is why time to first token grows with load.
- ``kv_usage``: the share of each worker's blocks held by requests, and the share of
  admitted tokens the prefix cache spared so far. Preemptions come when usage hits 100%.
- ``latency_histograms``: the two numbers a user feels, time to first token (queueing
  and the whole prompt) and the gap between tokens (one step, longer when the step also
  carries prompt chunks or when a preemption makes a request wait).

Every view takes a ``Trace`` and an optional axes, returns the figure it drew on, and
draws an empty axes with a short note when the trace has nothing for it yet (a live view
starts before any request). They are cheap enough to redraw twice a second: a few
artists per view however long the trace (bars are one collection per kind; the batch
view keeps the latest ``max_steps`` steps, the timeline the latest ``max_requests``).
To redraw on the same figure, ``figure.clear()`` it first: ``kv_usage`` adds a twin axes.
Artists that tests (and curious readers) look for carry a ``gid``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from modkit.trace import Trace
from modkit.viz.blocks import (
    NotebookFigure,
    block_grid,
    color_of,
    figure_of,
    new_axes,
    no_data,
    request_colors,
    short_id,
)

WAIT_COLOR = "0.72"
PROMPT_COLOR = "tab:orange"
DECODE_COLOR = "tab:blue"
PREEMPT_COLOR = "tab:red"
HIT_RATE_COLOR = "tab:green"
# tab10 without the green and red that mean hit rate and preemption.
_WORKER_COLORS = [matplotlib.colormaps["tab10"](i) for i in (0, 1, 4, 5, 6, 7, 8, 9)]


def timeline(trace: Trace, worker_id: int | None = None, ax: Axes | None = None, max_requests: int = 40) -> Figure:
    """Requests as rows (first arrival on top; the latest ``max_requests``), time across.

    Bars (one ``PolyCollection`` each, gids "waiting", "prompt", "decode"): waiting from
    arrival, or from a preemption, to the next step that schedules the request (or its end,
    or now); each step that computed a chunk of its prompt; each run of consecutive decode
    steps, merged into one bar. Markers: "arrival" (a square in the request's color, as in
    ``block_grid``) and "preempted" (a cross at the start of each step that preempted it).
    ``worker_id``: only that worker's requests (None: every worker's).
    """
    if max_requests < 1:
        raise ValueError(f"max_requests must be >= 1, got {max_requests}")
    figure, ax = new_axes(ax, (10.0, 6.0))
    requests = trace.requests
    if worker_id is not None:
        requests = requests[requests["worker_id"] == worker_id]
    # A recording that began mid-run has requests that never arrived in it: place them where first scheduled.
    t_in = requests["arrival"].astype(float).fillna(requests["first_scheduled"].astype(float))
    requests = requests.assign(t_in=t_in).dropna(subset=["t_in"]).sort_values("t_in", kind="stable")
    where = f"worker {worker_id}" if worker_id is not None else "all workers"
    if not len(requests):
        no_data(ax, f"no requests yet ({where})")
        return figure
    total = len(requests)
    requests = requests.tail(max_requests)
    row = {req_id: i for i, req_id in enumerate(requests["req_id"])}
    now = _now(trace)
    colors = request_colors(trace)

    scheduled = trace.scheduled
    scheduled = scheduled[scheduled["req_id"].isin(list(row))]
    if worker_id is not None:
        scheduled = scheduled[scheduled["worker_id"] == worker_id]
    preempted = scheduled[scheduled["kind"] == "preempted"]
    computed = scheduled[scheduled["kind"] != "preempted"]
    prompts = computed[computed["kind"] == "prompt"]
    decodes = _merge_runs(computed[computed["kind"] == "decode"])

    def rows(frame: Any) -> Any:
        return frame["req_id"].map(row).to_numpy(float)

    waits = _waits(requests, computed, preempted, now)
    _bars(ax, rows(waits), waits["start"], waits["end"], 0.3, WAIT_COLOR, "waiting")
    _bars(ax, rows(prompts), prompts["start"], prompts["end"], 0.7, PROMPT_COLOR, "prompt")
    _bars(ax, rows(decodes), decodes["start"], decodes["end"], 0.7, DECODE_COLOR, "decode")
    ax.scatter(
        requests["t_in"],
        range(len(requests)),
        marker="s",
        s=22,
        c=[color_of(colors, r) for r in requests["req_id"]],
        edgecolors="0.3",
        linewidths=0.5,
        zorder=3,
        gid="arrival",
        label="arrival (request's color)",
    )
    ax.scatter(
        preempted["start"],
        rows(preempted),
        marker="X",
        s=50,
        c=PREEMPT_COLOR,
        zorder=4,
        gid="preempted",
        label=f"preempted ({len(preempted)})",
    )

    labels = [short_id(r) for r in requests["req_id"]]
    if worker_id is None:
        labels = [f"{s} w{w:.0f}" for s, w in zip(labels, requests["worker_id"].astype(float), strict=True)]
    ax.set_yticks(range(len(requests)), labels, fontsize=7 if len(requests) > 20 else 8)
    ax.set_ylim(len(requests) - 0.5, -0.5)
    first = float(requests["t_in"].min())
    ax.set_xlim(first - 0.01 * (now - first), now + 0.01 * (now - first) + 1e-3)
    ax.set_xlabel("time (s)")
    shown = f"latest {len(requests)} of {total}" if total > len(requests) else f"{total}"
    ax.set_title(f"requests of {where} ({shown} requests)")
    ax.legend(loc="lower left", fontsize=8)
    return figure


def batch_composition(trace: Trace, worker_id: int = 0, ax: Axes | None = None, max_steps: int = 300) -> Figure:
    """Worker ``worker_id``'s steps (the latest ``max_steps``) as stacked bars: prompt tokens, then decode tokens.

    Steps are at x = their step number, one unit wide. Three ``StepPatch``es (``ax.stairs``)
    draw them: gid "prompt" from 0 up to the prompt tokens, gid "decode" from there up by
    the decode tokens, and gid "budget", the line of each step's token budget. A triangle
    above a step (gid "preempted") marks a step that preempted. When no step used even a
    quarter of its budget (a few decodes under a 2,048-token budget), the y axis fits the
    tokens used and the budget line stays above it, named in the legend and the title,
    so the bars are not flat lines under an empty plot.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    figure, ax = new_axes(ax, (10.0, 3.5))
    steps = trace.steps
    steps = steps[steps["worker_id"] == worker_id].sort_values("step")
    total = len(steps)
    steps = steps.tail(max_steps)
    if not len(steps):
        no_data(ax, f"no steps of worker {worker_id} yet")
        return figure
    x = steps["step"].to_numpy(float)
    prompt, decode = steps["num_prompt_tokens"].to_numpy(float), steps["num_decode_tokens"].to_numpy(float)
    budget = steps["token_budget"].to_numpy(float)
    preempted = steps["num_preempted"].to_numpy() > 0
    used = prompt + decode
    zoomed = float(used.max()) < float(budget.max()) / 4
    top = max(1.0, float(used.max())) if zoomed else max(float(budget.max()), float(used.max()))

    # NOTE: stairs, not bar(): one artist per kind instead of a patch per step, which bar() makes slowly.
    edges = np.append(x - 0.5, x[-1] + 0.5)
    ax.stairs(prompt, edges, fill=True, color=PROMPT_COLOR, gid="prompt", label="prompt tokens")
    ax.stairs(used, edges, baseline=prompt, fill=True, color=DECODE_COLOR, gid="decode", label="decode tokens")
    label = f"token budget ({budget[-1]:.0f})"
    ax.stairs(budget, edges, baseline=None, color="black", linestyle="--", gid="budget", label=label)
    ax.scatter(
        x[preempted],
        np.full(int(preempted.sum()), top * 1.06),
        marker="v",
        s=30,
        c=PREEMPT_COLOR,
        gid="preempted",
        label=f"step that preempted ({preempted.sum()})",
    )
    ax.set_ylim(0, top * 1.14)
    ax.set_xlim(x[0] - 0.5, x[-1] + 0.5)
    ax.set_xlabel(f"step of worker {worker_id}")
    ax.set_ylabel("tokens")
    shown = f"latest {len(steps)} of {total} steps" if total > len(steps) else f"{total} steps"
    above = f"; budget {budget[-1]:.0f} tokens, above the axis" if zoomed else ""
    ax.set_title(f"batch composition, worker {worker_id} ({shown}{above})")
    ax.legend(loc="center right", fontsize=8, framealpha=0.9)
    return figure


def kv_usage(trace: Trace, ax: Axes | None = None) -> Figure:
    """Blocks held over time (a line a worker, gid "kv_usage.<worker>"), with the cumulative prefix hit rate.

    Usage is each step's ``kv_usage`` from its start (held blocks over usable ones), so a
    step's line holds until that worker's next step; the line ends at the worker's last
    block event with what its pool holds then (after the last step, finished requests give
    their blocks back, and a line that stopped at the last step would never come down to
    zero); red crosses (gid "preempted") mark
    steps that preempted. On a twin axes (``ax.twinx()``, added to the figure), the
    line gid "hit_rate" is prefix-cache hits over queries, in tokens, of every worker's
    steps up to each moment: at the end, ``trace.prefix_hit_rate()``.
    """
    figure, ax = new_axes(ax, (10.0, 3.5))
    steps = trace.steps
    if not len(steps):
        no_data(ax, "no steps yet")
        return figure
    steps = steps.sort_values("start", kind="stable")
    for i, (worker, of_worker) in enumerate(steps.groupby("worker_id")):
        color = _WORKER_COLORS[i % len(_WORKER_COLORS)]
        start, usage = list(of_worker["start"]), list(of_worker["kv_usage"])
        last_event = _last_block_event(trace, int(worker))
        if last_event > start[-1]:
            state = trace.block_state(int(worker))
            start.append(last_event)
            usage.append(state.counts()["held"] / max(1, state.num_blocks - 1))
        ax.plot(start, usage, drawstyle="steps-post", color=color, gid=f"kv_usage.{worker}", label=f"worker {worker}")
    preempted = steps[steps["num_preempted"] > 0]
    ax.scatter(
        preempted["start"],
        preempted["kv_usage"],
        marker="X",
        s=40,
        c=PREEMPT_COLOR,
        zorder=3,
        gid="preempted",
        label=f"preemption ({len(preempted)})",
    )
    # A big pool and a light load (a default launch has thousands of blocks) would leave a
    # line flat on zero: the axis then fits the peak, and the title says so.
    peak = float(steps["kv_usage"].max())
    zoomed = 0 < peak < 0.2
    ax.set_ylim(0, peak * 1.25 if zoomed else 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("KV blocks held")
    ax.set_xlabel("time (s)")

    queries = steps["prefix_cache_queries"].cumsum().to_numpy(float)
    hits = steps["prefix_cache_hits"].cumsum().to_numpy(float)
    rate = np.divide(hits, queries, out=np.full(len(steps), np.nan), where=queries > 0)
    final = rate[-1] if queries[-1] > 0 else 0.0
    twin = ax.twinx()
    label = f"prefix hit rate so far ({final:.0%} of {queries[-1]:.0f} tokens)"
    twin.plot(steps["start"], rate, color=HIT_RATE_COLOR, linestyle="--", gid="hit_rate", label=label)
    twin.set_ylim(0, 1.05)
    twin.yaxis.set_major_formatter(PercentFormatter(1.0))
    twin.set_ylabel("prefix hit rate", color=HIT_RATE_COLOR)
    handles = [*ax.get_legend_handles_labels()[0], *twin.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.9)
    note = f" (usage axis zoomed: peak {peak:.1%} of the pool)" if zoomed else ""
    ax.set_title(f"KV cache usage and prefix-cache hits{note}")
    return figure


def latency_histograms(trace: Trace, axes: Sequence[Axes] | None = None) -> Figure:
    """Histograms of time to first token and of inter-token latency, in ms, on ``axes[0]`` and ``axes[1]``.

    TTFT is ``trace.requests.ttft`` (arrival to the frontend's first token), ITL is
    ``trace.tokens.itl`` (the gap between two token messages of one request). Vertical
    lines (gids "p50" and "p99") mark the percentiles (``np.percentile``'s, linear),
    their values in the legend.
    """
    figure: Figure
    if axes is None:
        figure = NotebookFigure(figsize=(10.0, 3.5), layout="constrained")
        axes = list(figure.subplots(1, 2))
    else:
        figure = figure_of(axes[0])
    _histogram(axes[0], trace.requests["ttft"], "TTFT", "requests", "tab:purple")
    _histogram(axes[1], trace.tokens["itl"], "ITL", "gaps", DECODE_COLOR)
    return figure


def dashboard(trace: Trace, worker_id: int = 0) -> Figure:
    """Every view on one figure: worker ``worker_id``'s blocks, batches and requests, then usage and latencies."""
    figure = NotebookFigure(figsize=(16.0, 13.0), layout="constrained")
    grid = figure.add_gridspec(3, 4, height_ratios=[1.0, 1.5, 1.0])
    block_grid(trace, worker_id, ax=figure.add_subplot(grid[0, :2]))
    batch_composition(trace, worker_id, ax=figure.add_subplot(grid[0, 2:]))
    timeline(trace, worker_id, ax=figure.add_subplot(grid[1, :]))
    kv_usage(trace, ax=figure.add_subplot(grid[2, :2]))
    latency_histograms(trace, axes=[figure.add_subplot(grid[2, 2]), figure.add_subplot(grid[2, 3])])
    model = trace.meta.get("model", "modkit")
    num_workers = trace.meta.get("num_workers", "?")
    summary = f"{len(trace.requests)} requests, {len(trace.steps)} steps, {_now(trace):.1f} s"
    figure.suptitle(f"{model}: worker {worker_id} of {num_workers} ({summary})")
    return figure


# -- helpers ------------------------------------------------------------------------------


def _bars(ax: Axes, rows: Any, starts: Any, ends: Any, height: float, color: str, gid: str) -> None:
    """One ``PolyCollection`` of rectangles ``starts[i]..ends[i]`` across, centred on ``rows[i]``."""
    y, x0, x1 = (np.asarray(v, dtype=float) for v in (rows, starts, ends))
    h = height / 2
    corners = [(x0, y - h), (x0, y + h), (x1, y + h), (x1, y - h)]
    verts = np.stack([np.stack(c, axis=-1) for c in corners], axis=1)  # (bars, 4 corners, xy)
    ax.add_collection(PolyCollection(list(verts), facecolors=color, edgecolors="none", gid=gid, label=gid))


def _waits(requests: Any, computed: Any, preempted: Any, now: float) -> Any:
    """One row (req_id, start, end) per wait: from arrival or a preemption to the next step that computes for it.

    With no such step yet, a wait lasts until the request finished (aborted while it
    waited) or, if it has not, until ``now``.
    """
    step_starts = {req_id: np.sort(g.to_numpy(float)) for req_id, g in computed.groupby("req_id")["start"]}
    finished = dict(zip(requests["req_id"], requests["finished"].astype(float).fillna(now), strict=True))
    rows = []
    # A step that starts the moment a request arrives may compute it; the step that preempts it, never.
    begins = [(r, t, False) for r, t in zip(requests["req_id"], requests["t_in"], strict=True)]
    begins += [(r, t, True) for r, t in zip(preempted["req_id"], preempted["start"], strict=True)]
    for req_id, start, preempt in begins:
        starts = step_starts.get(req_id, np.empty(0))
        i = int(np.searchsorted(starts, start, side="right" if preempt else "left"))
        end = float(starts[i]) if i < len(starts) else finished[req_id]
        rows.append({"req_id": req_id, "start": start, "end": end})
    return pd.DataFrame(rows, columns=["req_id", "start", "end"])


def _merge_runs(decodes: Any) -> Any:
    """One row (req_id, start, end) per run of a request's decodes in consecutive steps of one worker.

    Step numbers are each worker's own: a request moved to another worker after its worker
    died starts a new run there, so the time it waited in between is not drawn as decoding.
    """
    decodes = decodes.sort_values(["req_id", "start"], kind="stable")
    previous = decodes.shift()
    same_run = (
        (decodes["req_id"] == previous["req_id"])
        & (decodes["worker_id"] == previous["worker_id"])
        & (decodes["step"] == previous["step"] + 1)
    )
    runs = decodes.groupby((~same_run).cumsum())
    return runs.agg(req_id=("req_id", "first"), start=("start", "min"), end=("end", "max"))


def _histogram(ax: Axes, seconds: Any, title: str, unit: str, color: str) -> None:
    """A histogram of ``seconds`` (a Series, NaN for none), in ms, with its p50 and p99."""
    values = seconds.astype(float).dropna().to_numpy() * 1000.0
    if not len(values):
        no_data(ax, f"no {title} yet")
        ax.set_title(title)
        return
    # NOTE: latencies spread over decades (a 40 ms step, a 5 s wait after a preemption): log bins keep both visible.
    low, high = float(values.min()), float(values.max())
    if low > 0 and high > 20 * low:
        bins = np.geomspace(low, high, 31)
        ax.set_xscale("log")
    else:
        bins = np.linspace(low, high + 1e-9, 31)
    ax.stairs(*np.histogram(values, bins=bins), fill=True, color=color, alpha=0.8, gid="histogram")
    for q, style in ((50, "--"), (99, ":")):
        value = float(np.percentile(values, q))
        ax.axvline(value, color="black", linestyle=style, gid=f"p{q}", label=f"p{q} = {value:.1f} ms")
    ax.set_xlabel("ms")
    ax.set_ylabel(unit)
    ax.set_title(f"{title} ({len(values)} {unit})")
    ax.legend(loc="upper right", fontsize=8)


def _last_block_event(trace: Trace, worker_id: int) -> float:
    blocks = trace.blocks
    times = blocks["t"][blocks["worker_id"] == worker_id] if len(blocks) else []
    return float(max(times)) if len(times) else float("-inf")


def _now(trace: Trace) -> float:
    """The latest time the trace knows of, in seconds (0.0 for an empty trace)."""
    columns = (trace.steps["end"], trace.tokens["t"], trace.requests["arrival"], trace.requests["finished"])
    return max((float(c.max()) for c in columns if c.notna().any()), default=0.0)
