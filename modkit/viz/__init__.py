"""Matplotlib figures of a ``Trace``: what the engine did, step by step and block by block.

::

    from modkit import viz
    viz.dashboard(trace)                         # every view at once (a Figure; Jupyter shows it)
    viz.block_grid(trace, worker_id=1, at=2.5)   # the KV pool of worker 1, 2.5 s in
    viz.VIEWS["timeline"](trace)                 # a view named by string

======================  ================================================================
view                    what it teaches
======================  ================================================================
``block_grid``          paged KV memory: scattered blocks, prefix blocks shared by
                        requests, cached blocks kept for the next hit (``blocks.py``)
``timeline``            a request's life: queueing, chunked prefill, decode, preemption
``batch_composition``   a step is one token budget shared by prompt chunks and decodes
``kv_usage``            a full pool means preemption; how much the prefix cache spares
``latency_histograms``  TTFT and inter-token latency, with p50 and p99
``handoffs``            disaggregation: prompts on prefill workers, their KV blocks moved
                        to decode workers, each transfer an arrow (``transfers.py``)
======================  ================================================================

Each takes a ``Trace`` (any snapshot, even an empty one) and optionally the axes to draw
on, and returns a ``matplotlib.figure.Figure`` (a ``NotebookFigure`` when it made it),
made without pyplot so that a background thread may draw it and Jupyter shows it once, as
a PNG, in any kernel. ``viz.subplots`` makes such a figure for several views side by side,
``dashboard`` puts them all on one figure, and ``live`` redraws views in a notebook while
a pipeline runs (``live.py``). ``viz.capacity`` draws a capacity sweep (``modkit.sim``):
latency against offered rate for several configurations, each knee marked.
"""

from collections.abc import Callable

from matplotlib.figure import Figure

from modkit.viz.blocks import NotebookFigure, block_grid, request_colors, subplots
from modkit.viz.capacity import capacity
from modkit.viz.live import LiveView, live
from modkit.viz.static import batch_composition, dashboard, kv_usage, latency_histograms, timeline
from modkit.viz.transfers import handoffs

VIEWS: dict[str, Callable[..., Figure]] = {
    "block_grid": block_grid,
    "timeline": timeline,
    "batch_composition": batch_composition,
    "kv_usage": kv_usage,
    "latency_histograms": latency_histograms,
    "handoffs": handoffs,
}

__all__ = [
    "VIEWS",
    "LiveView",
    "NotebookFigure",
    "batch_composition",
    "block_grid",
    "capacity",
    "dashboard",
    "handoffs",
    "kv_usage",
    "latency_histograms",
    "live",
    "request_colors",
    "subplots",
    "timeline",
]
