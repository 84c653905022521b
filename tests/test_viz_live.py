"""Live views: redrawn from a growing trace, never faster than they can draw, stopped cleanly.

The views themselves (what each figure shows) are tested in ``test_viz.py``; these tests are
about the redrawing loop, with the saved trace of a real pipeline run fed in piece by piece.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import pytest
from matplotlib.figure import Figure
from waiting import wait_until

from modkit.trace import Trace
from modkit.viz.live import LiveView

SAVED = Path(__file__).parent / "data" / "trace_2workers.json.gz"
PNG = b"\x89PNG\r\n\x1a\n"


class Growing:
    """A source that returns a longer prefix of the saved trace at each call, like a recorder while requests run."""

    def __init__(self, step: int = 100) -> None:
        self.full = Trace.load(SAVED)
        self.step = step
        self.calls = 0

    def __call__(self) -> Trace:
        self.calls += 1
        return Trace(self.full.events[: self.calls * self.step], self.full.meta)


def test_a_live_view_redraws_as_the_trace_grows_and_ends_on_all_of_it() -> None:
    source = Growing()
    view = LiveView(source, ["block_grid", "batch_composition"], interval_s=0.05).start()
    wait_until(lambda: view.frames >= 3, 30)
    view.stop()
    print(f"{view.frames} frames, the last drawn in {view.last_draw_s * 1000:.0f} ms")
    assert view.error is None
    assert view.frames >= 3
    assert all(bytes(image.value).startswith(PNG) for image in view.images)
    assert len(view.images) == 2 and view.widget.children[1:] == tuple(view.images)
    assert view.status.value.startswith(f"{min(source.calls * 100, len(source.full))} events")


def test_a_slow_view_drops_frames_not_events() -> None:
    source = Growing(step=10)
    drawn: list[int] = []

    def slow(trace: Trace) -> Figure:
        drawn.append(len(trace))
        time.sleep(0.2)
        return Figure(figsize=(2, 1))

    view = LiveView(source, [slow], interval_s=0.05).start()
    t0 = time.monotonic()
    # Three frames from the view's thread, each ~4 intervals long; stop() draws one more.
    assert wait_until(lambda: view.frames >= 3, 30), f"{view.frames} frames in 30 s"
    view.stop()
    elapsed = time.monotonic() - t0
    assert view.skipped >= view.frames - 1 >= 2  # each frame took ~4 intervals: ~3 skipped per frame
    assert len(drawn) <= elapsed / 0.2 + 1  # never started a frame before the last one was done
    # Each frame drew the whole trace as it was then: later frames saw more, nothing was queued up.
    assert drawn == sorted(drawn) and drawn[-1] == len(Trace(source.full.events[: source.calls * 10]))


def test_a_source_that_fails_stops_the_view_and_says_why() -> None:
    def gone() -> Trace:
        raise RuntimeError("the pipeline was shut down")

    view = LiveView(gone, ["kv_usage"], interval_s=0.05).start()
    assert wait_until(lambda: view.error is not None, 10), "the view's thread never called the source"
    view.stop()
    assert isinstance(view.error, RuntimeError)
    assert view.status.value == "stopped: RuntimeError: the pipeline was shut down"


def test_views_are_named_or_given_and_take_the_kwargs_they_know() -> None:
    seen: dict[str, Any] = {}

    def mine(trace: Trace, worker_id: int = 0) -> Figure:
        seen["worker_id"] = worker_id
        return Figure(figsize=(2, 1))

    view = LiveView(Growing(), ["timeline", mine], interval_s=0.05, worker_id=1, max_requests=5)
    view.draw()
    assert seen == {"worker_id": 1} and view.frames == 1
    with pytest.raises(ValueError, match="no view 'blocks'; views: batch_composition, block_grid"):
        LiveView(Growing(), ["blocks"])
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        LiveView(Growing(), ["timeline"], interval_s=0)


KERNEL_CELLS = [
    f"from modkit import viz\nfrom modkit.trace import Trace\ntrace = Trace.load({str(SAVED)!r})",
    *[f"viz.{name}(trace)" for name in ("block_grid", "timeline", "batch_composition", "kv_usage")],
    "viz.latency_histograms(trace)",
    "viz.dashboard(trace)",
    "fig, axes = viz.subplots(1, 2)\nviz.kv_usage(trace, ax=axes[0])\nviz.block_grid(trace, ax=axes[1])\nfig",
    "view = viz.live(lambda: trace, 'block_grid', 'timeline')\ndisplay(view)\nview.stop()",
    "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()",  # pyplot's inline backend, now loaded
    "viz.kv_usage(trace)",
    "viz.dashboard(trace)",
]


@pytest.mark.slow
def test_every_view_shows_once_as_a_png_in_a_fresh_kernel() -> None:
    """In a kernel where pyplot never ran, a figure used to show as '<Figure size 1000x350 with 1 Axes>'
    (IPython's PNG formatter for figures comes with pyplot's inline backend), and a figure pyplot
    knew of showed twice. Each cell here must show exactly one PNG, before pyplot loads and after."""
    import nbclient
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in KERNEL_CELLS]
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    for cell in notebook.cells[1:]:
        outputs = [o for o in cell.outputs if o.output_type in ("display_data", "execute_result")]
        pngs = [o for o in outputs if "image/png" in o.get("data", {})]
        texts = [o["data"].get("text/plain", "") for o in outputs if "image/png" not in o.get("data", {})]
        assert len(pngs) == 1, f"{cell.source!r}: {len(pngs)} PNGs, other outputs {texts}"
        assert not [t for t in texts if t.startswith("<Figure size")], f"{cell.source!r} shows a figure as text"
