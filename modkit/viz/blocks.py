"""One worker's KV pool at one moment, as a grid of blocks (``block_grid``); and what every view shares.

What the grid teaches: paged attention cuts each request's KV cache into blocks of
``block_size`` tokens taken from one pool, so a request holds scattered blocks, not one
contiguous slab, and only its last, partly filled block wastes memory. A block is

- **held** (the color of its request): in some request's block table. A dot marks a
  block held by two requests or more: the later ones found that part of their prompt (a
  shared system prompt, say) already computed. A prefix-cache hit spares the compute of
  those tokens, and their memory: the block is stored once, however many requests share it;
- **cached but free** (light gray): no request holds it, but its hash still finds it, so
  the next request with the same prefix takes it back without computing it. These are
  what the pool evicts first when it runs short;
- **free** (near white): nothing in it worth keeping.

Block 0 (dark) is the reserved null block, never handed out. When held blocks fill the
pool, the scheduler has to preempt a request (``timeline`` shows when).

Every view draws on a ``NotebookFigure`` made here (``new_axes``, ``subplots``), never
through ``pyplot``: pyplot keeps global state that a background thread must not touch, and
a figure pyplot knows of is displayed a second time by Jupyter. A ``NotebookFigure`` shows
itself as a PNG in any Jupyter kernel, whether or not pyplot ever ran there (IPython's
own PNG formatter for figures exists only once pyplot has loaded its inline backend). A
request has one color in every view and every redraw (``request_colors``).
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.legend_handler import HandlerTuple
from matplotlib.patches import Patch

from modkit.trace import Trace

RGBA = tuple[float, float, float, float]

NULL_COLOR: RGBA = to_rgba("#303030")  # block 0, the reserved null block
FREE_COLOR: RGBA = to_rgba("#f3f3f3")
CACHED_COLOR: RGBA = to_rgba("#c4c4c4")  # free, but a prefix-cache hit can still take it
# tab20's dark colors, then its light ones, without the grays that would read as cached or
# free blocks: neighbours in this list differ in hue, and requests that arrive together take neighbours.
_PALETTE: list[RGBA] = [
    matplotlib.colormaps["tab20"](i) for i in (*range(0, 20, 2), *range(1, 20, 2)) if i not in (14, 15)
]
_LEGEND_REQUESTS = 6  # holders named in the legend, most blocks first


def request_colors(trace: Trace) -> dict[str, RGBA]:
    """The color of each request of ``trace`` (``trace.requests``), the same in every view and every redraw.

    Requests take the palette's colors in the order they first appear in the trace: those
    that run together get different colors (a hash of the id would give two of them one
    color as soon as a handful run), and as a trace only ever grows at its end, a later
    snapshot of it never recolors a request.
    """
    return {req_id: _PALETTE[i % len(_PALETTE)] for i, req_id in enumerate(trace.requests["req_id"])}


def color_of(colors: dict[str, RGBA], req_id: str) -> RGBA:
    """``colors[req_id]``, or for a request the trace does not know (its events were lost), a hash of its id."""
    # NOTE: crc32, not hash(): Python salts str hashes per process, and a color must not change between redraws.
    return colors.get(req_id) or _PALETTE[zlib.crc32(req_id.encode()) % len(_PALETTE)]


def short_id(req_id: str) -> str:
    """A label for ``req_id`` short enough for an axis: its last six characters."""
    return req_id if len(req_id) <= 8 else "…" + req_id[-6:]


DISPLAY_DPI = 100  # a 10-inch-wide view is 1,000 pixels wide in a notebook


class NotebookFigure(Figure):
    """A matplotlib ``Figure`` that Jupyter shows as one PNG, drawn with Agg, in any kernel."""

    def _repr_png_(self) -> bytes:
        from modkit.viz.live import render_png

        return render_png(self, dpi=DISPLAY_DPI)


def subplots(
    nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] | None = None, **kwargs: Any
) -> tuple[NotebookFigure, Any]:
    """A new ``NotebookFigure`` and its axes, as ``plt.subplots`` returns them, but without pyplot:
    for a figure of several views side by side that a notebook cell shows exactly once."""
    size = figsize or (5.0 * ncols, 3.5 * nrows)
    figure = NotebookFigure(figsize=size, layout="constrained")
    return figure, figure.subplots(nrows, ncols, squeeze=kwargs.pop("squeeze", True), **kwargs)


def new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """``ax`` and the figure it is on, or a new figure of ``figsize`` inches with one axes."""
    if ax is None:
        figure = NotebookFigure(figsize=figsize, layout="constrained")
        return figure, figure.add_subplot()
    return figure_of(ax), ax


def figure_of(ax: Axes) -> Figure:
    """The figure ``ax`` is on (the top one, if ``ax`` is on a subfigure)."""
    figure = ax.get_figure(root=True)
    assert figure is not None, "the axes given is on no figure"
    return figure


def no_data(ax: Axes, text: str) -> None:
    """Leave ``ax`` empty but for ``text`` in its middle: a view of a trace that has nothing for it yet."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.45")
    ax.set_xticks([])
    ax.set_yticks([])


def block_grid(
    trace: Trace,
    worker_id: int = 0,
    at: float | None = None,
    ax: Axes | None = None,
    columns: int | None = None,
    max_blocks: int = 512,
) -> Figure:
    """Worker ``worker_id``'s KV blocks ``at`` seconds into the trace (None: at its end), one cell a block.

    Cells read like text, block 0 first; the label of a row is the id of its first block.
    One image holds every cell shown (``ax.images[0]``, RGBA): a held block has the color of
    its first holder (``request_colors``), a free one ``CACHED_COLOR`` if its hash still
    finds it and ``FREE_COLOR`` if not, block 0 ``NULL_COLOR``; cells past the last block
    are transparent. One scatter (gid "shared") puts a dot on each block with 2+ holders.
    The legend, under the grid, has ``BlockState.counts()`` and the requests holding the
    most blocks; the title says how many blocks the pool has and how many are held.

    A pool of more than ``max_blocks`` blocks (a default launch has thousands) is shown from
    block 0 up to the highest block any request has used so far, rounded up to full rows
    (at least 64 blocks, at most ``max_blocks``): the pool hands out low ids first, so that
    is where the requests are, and a grid of 8,000 cells would show none of them. The title
    says which part is shown; the counts are always the whole pool's.
    ``columns``: cells a row (default: about twice as many columns as rows).
    """
    if max_blocks < 2:
        raise ValueError(f"max_blocks must be >= 2, got {max_blocks}")
    state = trace.block_state(worker_id, at)
    n = state.num_blocks
    shown = n if n <= max_blocks else min(max_blocks, max(64, _highest_used(trace, worker_id) + 1))
    columns = columns or min(shown, max(8, math.ceil(math.sqrt(2 * shown))))
    rows = math.ceil(shown / columns)
    figure, ax = new_axes(ax, (8.0, max(3.0, min(8.0, 2.2 + 5.0 * rows / columns))))
    if n <= 1:
        no_data(ax, f"no KV blocks of worker {worker_id} yet")
        return figure

    colors = request_colors(trace)
    shown_holders: dict[str, RGBA] = {}  # the holders' colors, in block order
    cells = np.zeros((rows * columns, 4))  # (rows * columns, RGBA); alpha 0 past the last block
    for b, (owners, cached) in enumerate(zip(state.owners[:shown], state.cached[:shown], strict=True)):
        if owners:
            cells[b] = shown_holders.setdefault(owners[0], color_of(colors, owners[0]))
        else:
            cells[b] = CACHED_COLOR if cached else FREE_COLOR
    cells[0] = NULL_COLOR
    ax.imshow(cells.reshape(rows, columns, 4), interpolation="nearest")

    shared = np.array([b for b, owners in enumerate(state.owners[:shown]) if len(owners) > 1], dtype=int)
    counts = state.counts()
    dots = ax.scatter(shared % columns, shared // columns, s=30, c="black", edgecolors="white", gid="shared")

    # White lines between cells (minor ticks sit on the cell edges), block ids on the rows.
    ax.set_xticks(np.arange(-0.5, columns), minor=True)
    ax.set_yticks(np.arange(-0.5, rows), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5 if columns <= 32 else 0.5)
    ax.tick_params(which="minor", length=0)
    ax.tick_params(which="major", length=0, labelsize=8)
    x_step, y_step = math.ceil(columns / 8), math.ceil(rows / 12)
    ax.set_xticks(range(0, columns, x_step), [f"+{c}" for c in range(0, columns, x_step)])
    ax.set_yticks(range(0, rows, y_step), [str(r * columns) for r in range(0, rows, y_step)])
    ax.set_xlim(-0.5, columns - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)

    holders = Counter(owner for owners in state.owners for owner in owners)
    some_holders = tuple(Patch(facecolor=c) for c in list(shown_holders.values())[:4]) or Patch(facecolor=FREE_COLOR)
    legend: dict[Any, str] = {  # handle -> label
        some_holders: f"held: {counts['held']}",
        dots: f"shared by 2+: {counts['shared']}",
        Patch(facecolor=CACHED_COLOR): f"cached, free: {counts['cached_free']}",
        Patch(facecolor=FREE_COLOR, edgecolor="0.7"): f"free, uncached: {counts['free'] - counts['cached_free']}",
        Patch(facecolor=NULL_COLOR): "null block 0",
    }
    for req_id, num in holders.most_common(_LEGEND_REQUESTS):
        legend[Patch(facecolor=color_of(colors, req_id))] = f"{short_id(req_id)}: {num} blocks"
    if len(holders) > _LEGEND_REQUESTS:
        legend[Patch(visible=False)] = f"and {len(holders) - _LEGEND_REQUESTS} more requests"
    ax.legend(
        handles=list(legend),
        labels=list(legend.values()),
        handler_map={tuple: HandlerTuple(ndivide=None, pad=0)},
        loc="upper center",
        bbox_to_anchor=(0.5, -0.04),
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    when = f"t = {at:.2f} s" if at is not None else f"t = {_last_block_time(trace, worker_id):.2f} s (end)"
    usage = counts["held"] / (n - 1)
    part = f"; blocks 0-{shown - 1} shown" if shown < n else ""
    ax.set_title(
        f"worker {worker_id}, {when}\n{counts['held']} of {n - 1:,} blocks held ({usage:.0%}){part}", fontsize=10
    )
    return figure


def _highest_used(trace: Trace, worker_id: int) -> int:
    """The highest block id any request of ``worker_id`` was handed in the whole trace (0: none)."""
    blocks = trace.blocks
    if not len(blocks):
        return 0
    ids = blocks["block_id"][blocks["worker_id"] == worker_id]
    return int(ids.max()) if len(ids) else 0


def _last_block_time(trace: Trace, worker_id: int) -> float:
    blocks = trace.blocks
    times = blocks["t"][blocks["worker_id"] == worker_id] if len(blocks) else blocks["t"]
    return float(times.max()) if len(times) else 0.0
