"""modkit.viz draws what the trace says: cells, bars and markers are checked against the trace's own frames."""

from __future__ import annotations

import inspect
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import msgspec
import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import StepPatch
from matplotlib.text import Text

from modkit import viz
from modkit.trace import Trace
from modkit.viz.blocks import CACHED_COLOR, FREE_COLOR, NULL_COLOR
from modkit.viz.live import LiveView, render_png
from modkit.viz.static import _merge_runs

TRACE = Path(__file__).parent / "data" / "trace_2workers.json.gz"
ALL_VIEWS: dict[str, Callable[..., Figure]] = {**viz.VIEWS, "dashboard": viz.dashboard}


@pytest.fixture(scope="module")
def trace() -> Trace:
    return Trace.load(TRACE)


@pytest.fixture(scope="module")
def mid(trace: Trace) -> float:
    """The first step start at which both workers have held, shared, cached-free and free blocks."""
    for t in trace.steps.start.sort_values():
        if all(min(trace.block_state(w, at=t).counts().values()) > 0 for w in (0, 1)):
            return float(t)
    raise AssertionError("the saved trace never has every kind of block on both workers at once")


def by_gid(ax: Axes, gid: str) -> Any:
    """The one artist of ``ax`` with this gid."""
    found = [a for a in ax.get_children() if a.get_gid() == gid]
    assert len(found) == 1, f"{len(found)} artists with gid {gid!r}"
    return found[0]


def texts(figure: Figure) -> str:
    """Every text of the figure (titles, labels, legends, notes), one a line."""
    return "\n".join(a.get_text() for a in figure.findobj() if isinstance(a, Text))


# -- block_grid -----------------------------------------------------------------------------


@pytest.mark.parametrize("worker_id", [0, 1])
def test_block_grid_colors_each_block_by_its_state(trace: Trace, mid: float, worker_id: int) -> None:
    state = trace.block_state(worker_id, at=mid)
    counts = state.counts()
    figure = viz.block_grid(trace, worker_id, at=mid)
    ax = figure.axes[0]
    cells = np.asarray(ax.images[0].get_array()).reshape(-1, 4)
    blocks, past_end = cells[: state.num_blocks], cells[state.num_blocks :]

    def matching(color: tuple[float, ...]) -> np.ndarray:
        return np.all(np.isclose(blocks, color), axis=1)

    assert np.all(past_end[:, 3] == 0), "cells past the last block are transparent"
    assert matching(NULL_COLOR)[0] and matching(NULL_COLOR).sum() == 1
    assert matching(CACHED_COLOR).sum() == counts["cached_free"]
    assert matching(FREE_COLOR).sum() == counts["free"] - counts["cached_free"]
    colored = ~(matching(NULL_COLOR) | matching(CACHED_COLOR) | matching(FREE_COLOR))
    assert colored.sum() == counts["held"]
    colors = viz.request_colors(trace)
    for b in np.flatnonzero(colored):
        assert np.allclose(blocks[b], colors[state.owners[b][0]]), f"block {b}"
    assert f"held: {counts['held']}" in texts(figure)


@pytest.mark.parametrize("columns", [None, 5])
def test_block_grid_marks_exactly_the_shared_blocks(trace: Trace, mid: float, columns: int | None) -> None:
    state = trace.block_state(0, at=mid)
    ax = viz.block_grid(trace, 0, at=mid, columns=columns).axes[0]
    width = ax.images[0].get_array().shape[1]  # type: ignore[union-attr]
    assert columns is None or width == columns
    dots = by_gid(ax, "shared")
    assert isinstance(dots, PathCollection)
    cells = np.rint(np.asarray(dots.get_offsets())).astype(int)  # (dots, xy): column, row
    marked = set((cells[:, 1] * width + cells[:, 0]).tolist())
    shared = {b for b, owners in enumerate(state.owners) if len(owners) >= 2}
    assert marked == shared and len(shared) == state.counts()["shared"] > 0


def test_request_colors_are_stable_and_distinct(trace: Trace, mid: float) -> None:
    """A request keeps its color in every draw, in a later snapshot and in another process; neighbours differ."""
    colors = viz.request_colors(trace)
    early = viz.request_colors(Trace(trace.events[:50], trace.meta))
    assert 0 < len(early) < len(colors)
    assert all(colors[req_id] == color for req_id, color in early.items())
    consecutive = list(colors.values())
    assert len(set(consecutive)) == len(consecutive), "16 requests, 18 colors: no two alike"
    first, second = (viz.block_grid(trace, 1, at=mid).axes[0].images[0].get_array() for _ in range(2))
    assert np.array_equal(np.asarray(first), np.asarray(second))

    code = (
        "import sys\nfrom modkit import viz\nfrom modkit.trace import Trace\n"
        f"trace = Trace.load({str(TRACE)!r})\n"
        "viz.dashboard(trace).savefig(__import__('io').BytesIO(), format='png')\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'modkit.viz imported pyplot'\n"
        "print(list(viz.request_colors(trace).values()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(list(colors.values()))


# -- timeline -------------------------------------------------------------------------------


@pytest.mark.parametrize("worker_id", [None, 0, 1])
def test_timeline_marks_every_preemption(trace: Trace, worker_id: int | None) -> None:
    scheduled = trace.scheduled
    if worker_id is not None:
        scheduled = scheduled[scheduled["worker_id"] == worker_id]
    preempted = scheduled[scheduled["kind"] == "preempted"]
    assert len(preempted) > 0
    ax = viz.timeline(trace, worker_id).axes[0]
    rows = [t.get_text() for t in ax.get_yticklabels()]
    marks = by_gid(ax, "preempted").get_offsets()
    assert len(marks) == len(preempted)
    for (x, y), (req_id, start) in zip(marks, zip(preempted["req_id"], preempted["start"], strict=True), strict=True):
        assert x == pytest.approx(start)
        assert rows[int(y)].startswith(viz.blocks.short_id(req_id))


def test_timeline_bars_follow_the_scheduled_frame(trace: Trace) -> None:
    """A prompt bar per prompt chunk, a decode bar per run of consecutive decodes, a wait per arrival and preemption."""
    scheduled, requests = trace.scheduled, trace.requests
    ax = viz.timeline(trace).axes[0]
    prompt, decode, waiting = (by_gid(ax, gid) for gid in ("prompt", "decode", "waiting"))
    assert all(isinstance(c, PolyCollection) for c in (prompt, decode, waiting))
    assert len(prompt.get_paths()) == (scheduled["kind"] == "prompt").sum()
    decodes = scheduled[scheduled["kind"] == "decode"]
    runs = sum(int((np.diff(np.sort(g.to_numpy())) != 1).sum()) + 1 for _, g in decodes.groupby("req_id")["step"])
    assert len(decode.get_paths()) == runs < len(decodes)
    preempted = scheduled[scheduled["kind"] == "preempted"]
    assert len(waiting.get_paths()) == len(requests) + len(preempted)
    # After each preemption the request waits until the step that recomputes its prompt.
    waits = {(round(p.vertices[0, 0], 9), round(p.vertices[2, 0], 9)) for p in waiting.get_paths()}
    for req_id, start in zip(preempted["req_id"], preempted["start"], strict=True):
        later = scheduled[(scheduled["req_id"] == req_id) & (scheduled["start"] > start)]
        assert later["kind"].iloc[0] == "prompt"
        assert (round(start, 9), round(later["start"].iloc[0], 9)) in waits


def test_timeline_keeps_the_latest_requests(trace: Trace) -> None:
    ax = viz.timeline(trace, max_requests=5).axes[0]
    latest = trace.requests.sort_values("arrival")["req_id"].tail(5)
    shown = [t.get_text().split()[0] for t in ax.get_yticklabels()]
    assert shown == [viz.blocks.short_id(r) for r in latest]
    assert "latest 5 of 16" in ax.get_title()


# -- batch_composition ----------------------------------------------------------------------


@pytest.mark.parametrize("worker_id", [0, 1])
def test_batch_composition_bars_are_the_steps_tokens(trace: Trace, worker_id: int) -> None:
    steps = trace.steps[trace.steps["worker_id"] == worker_id].sort_values("step")
    ax = viz.batch_composition(trace, worker_id).axes[0]
    prompt, decode, budget = (by_gid(ax, gid) for gid in ("prompt", "decode", "budget"))
    assert all(isinstance(p, StepPatch) for p in (prompt, decode, budget))
    np.testing.assert_array_equal(prompt.get_data().values, steps["num_prompt_tokens"])
    decode_values, edges, decode_baseline = decode.get_data()
    np.testing.assert_array_equal(decode_values - decode_baseline, steps["num_decode_tokens"])
    np.testing.assert_array_equal((edges[:-1] + edges[1:]) / 2, steps["step"])
    assert np.all(decode_values <= budget.get_data().values), "a step used more tokens than its budget"
    assert decode_values.max() == budget.get_data().values.max() == 48  # the budget is reached
    marked = by_gid(ax, "preempted").get_offsets()[:, 0]
    np.testing.assert_array_equal(marked, steps["step"][steps["num_preempted"] > 0])


@pytest.fixture(scope="module")
def big_pool(trace: Trace) -> Trace:
    """The saved run's events in pools of 8,191 blocks (a default launch's size), so that the
    requests use a sliver of the pool and the steps a sliver of a 2,048-token budget."""
    usable = [trace.num_blocks(w) - 1 for w in (0, 1)]
    events = [
        msgspec.structs.replace(e, token_budget=2048, kv_usage=e.kv_usage * usable[e.worker_id] / 8190)
        if hasattr(e, "token_budget")
        else e
        for e in trace.events
    ]
    return Trace(events, {**trace.meta, "num_blocks": [8191, 8191]})


def test_block_grid_of_a_big_pool_shows_the_blocks_in_use(big_pool: Trace, mid: float) -> None:
    state = big_pool.block_state(0, at=mid)
    figure = viz.block_grid(big_pool, 0, at=mid)
    ax = figure.axes[0]
    cells = np.asarray(ax.images[0].get_array()).reshape(-1, 4)
    highest = int(big_pool.blocks.block_id[big_pool.blocks.worker_id == 0].max())
    assert highest < 64 <= len(cells) < 128, "from block 0 to the highest used, at least 64, full rows"
    held = [b for b, owners in enumerate(state.owners) if owners]
    assert held and max(held) < len(cells), "every held block is in the grid"
    title = ax.get_title()
    assert "of 8,190 blocks held" in title and f"blocks 0-{64 - 1} shown" in title
    assert f"free, uncached: {state.counts()['free'] - state.counts()['cached_free']}" in texts(figure)


def test_block_grid_refuses_too_small_a_window(trace: Trace) -> None:
    with pytest.raises(ValueError, match="max_blocks"):
        viz.block_grid(trace, max_blocks=1)


def test_light_load_under_a_big_budget_zooms_the_axes(big_pool: Trace) -> None:
    batches = viz.batch_composition(big_pool, 0).axes[0]
    used = big_pool.steps[big_pool.steps.worker_id == 0][["num_prompt_tokens", "num_decode_tokens"]].sum(axis=1)
    assert batches.get_ylim()[1] < 2048 / 4 and batches.get_ylim()[1] >= used.max()
    assert "budget 2048 tokens, above the axis" in batches.get_title()
    usage = viz.kv_usage(big_pool).axes[0]
    peak = big_pool.steps.kv_usage.max()
    assert peak < 0.2 and usage.get_ylim()[1] == pytest.approx(peak * 1.25)
    assert "zoomed" in usage.get_title()


# -- kv_usage -------------------------------------------------------------------------------


def test_kv_usage_follows_the_steps_and_ends_at_the_hit_rate(trace: Trace) -> None:
    figure = viz.kv_usage(trace)
    ax, twin = figure.axes
    for worker_id in (0, 1):
        line = by_gid(ax, f"kv_usage.{worker_id}")
        steps = trace.steps[trace.steps["worker_id"] == worker_id].sort_values("start")
        usage = np.asarray(line.get_ydata())
        np.testing.assert_allclose(usage[: len(steps)], steps["kv_usage"])
        # After the last step, the line ends with what the pool holds at its last block event.
        state = trace.block_state(worker_id)
        assert usage[-1] == pytest.approx(state.counts()["held"] / (state.num_blocks - 1))
    assert len(by_gid(ax, "preempted").get_offsets()) == (trace.steps["num_preempted"] > 0).sum()
    rate = by_gid(twin, "hit_rate")
    assert isinstance(rate, Line2D)
    assert np.asarray(rate.get_ydata())[-1] == pytest.approx(trace.prefix_hit_rate())
    assert 0.5 < trace.prefix_hit_rate() < 1.0  # the shared system prompts hit


# -- latency_histograms ---------------------------------------------------------------------


def test_latency_percentiles_match_the_frames(trace: Trace) -> None:
    ttft_ax, itl_ax = viz.latency_histograms(trace).axes
    for ax, seconds in ((ttft_ax, trace.requests["ttft"]), (itl_ax, trace.tokens["itl"])):
        ms = seconds.dropna().to_numpy() * 1000
        assert by_gid(ax, "histogram").get_data().values.sum() == len(ms)
        legend = [t.get_text() for t in ax.get_legend().get_texts()]  # type: ignore[union-attr]
        for q in (50, 99):
            expected = np.percentile(ms, q)
            assert by_gid(ax, f"p{q}").get_xdata()[0] == pytest.approx(expected)
            assert f"p{q} = {expected:.1f} ms" in legend


# -- every view -----------------------------------------------------------------------------


def test_views_are_the_six_named_ones() -> None:
    five = {"block_grid", "timeline", "batch_composition", "kv_usage", "latency_histograms"}
    assert set(viz.VIEWS) == five | {"handoffs"}  # handoffs: tests/test_disaggregation.py draws real transfers


@pytest.mark.parametrize("name", sorted(ALL_VIEWS))
def test_every_view_draws_an_empty_trace(name: str, tmp_path: Path) -> None:
    figure = ALL_VIEWS[name](Trace([], {}))
    assert isinstance(figure, Figure)
    assert "yet" in texts(figure)
    figure.savefig(tmp_path / f"{name}.png")
    assert (tmp_path / f"{name}.png").stat().st_size > 0


@pytest.mark.parametrize("name", sorted(ALL_VIEWS))
@pytest.mark.parametrize("worker_id", [0, 1])
def test_every_view_draws_the_first_events_of_a_run(trace: Trace, name: str, worker_id: int, tmp_path: Path) -> None:
    early = Trace(trace.events[:50], trace.meta)
    view = ALL_VIEWS[name]
    kwargs = {"worker_id": worker_id} if "worker_id" in view.__code__.co_varnames else {}
    figure = view(early, **kwargs)
    figure.savefig(tmp_path / f"{name}.png")
    assert (tmp_path / f"{name}.png").stat().st_size > 0


def test_views_draw_on_the_axes_they_are_given(trace: Trace) -> None:
    figure = Figure()
    axes = figure.subplots(2, 3).ravel()
    for ax, name in zip(axes, ("block_grid", "timeline", "batch_composition", "kv_usage"), strict=False):
        assert viz.VIEWS[name](trace, ax=ax) is figure
    assert viz.latency_histograms(trace, axes=axes[4:]) is figure
    assert len(figure.axes) == 7  # the six given, and kv_usage's twin


def test_views_draw_from_a_background_thread(trace: Trace) -> None:
    """What the live view does: draw and render on a thread of its own."""
    errors: list[BaseException] = []

    def draw() -> None:
        try:
            viz.dashboard(trace).savefig(io.BytesIO(), format="png", dpi=60)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=draw)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive() and not errors, errors


def test_views_are_quick_enough_to_redraw_live(trace: Trace) -> None:
    """Each view, drawn and rendered to PNG as a live view does (best of 3), takes less than the
    live view's default interval, so a live view of it redraws without skipping frames; the
    dashboard, at most half again what its views take one by one. Measured in this thread's CPU
    time, which other processes on the machine do not inflate as they do wall time."""
    for frame in ("steps", "scheduled", "requests", "tokens", "blocks"):
        getattr(trace, frame)  # built once per snapshot, whatever draws it: not the views' cost
    interval_s = inspect.signature(LiveView).parameters["interval_s"].default
    cpu_s = {}
    for name, view in ALL_VIEWS.items():
        best = float("inf")
        for _ in range(3):
            start = time.thread_time()
            png = render_png(view(trace))
            best = min(best, time.thread_time() - start)
        assert png.startswith(b"\x89PNG"), name
        cpu_s[name] = best
    timings = ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in cpu_s.items())
    assert all(cpu_s[name] < interval_s for name in viz.VIEWS), f"interval {interval_s} s; {timings}"
    assert cpu_s["dashboard"] < 1.5 * sum(cpu_s[name] for name in viz.VIEWS), timings


def test_views_reject_a_cap_below_one(trace: Trace) -> None:
    with pytest.raises(ValueError, match="max_requests"):
        viz.timeline(trace, max_requests=0)
    with pytest.raises(ValueError, match="max_steps"):
        viz.batch_composition(trace, max_steps=0)


def test_timeline_does_not_draw_a_moved_request_as_decoding_while_it_waited() -> None:
    """A request whose worker died decodes on another worker later; step numbers are each
    worker's own, and may well run on from the dead worker's. Two runs, not one bar over the gap."""
    decodes = pd.DataFrame(
        {
            "worker_id": [1, 1, 3, 3],
            "step": [5, 6, 7, 8],
            "start": [0.10, 0.12, 3.00, 3.02],
            "end": [0.11, 0.13, 3.01, 3.03],
            "req_id": ["r"] * 4,
        }
    )
    runs = _merge_runs(decodes)
    assert runs[["start", "end"]].values.tolist() == [[0.10, 0.13], [3.00, 3.03]]
