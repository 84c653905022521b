"""Live views: the static figures of ``modkit.viz``, redrawn in a notebook while requests run.

::

    view = viz.live(pipeline, "block_grid", "batch_composition")   # shows itself when it is a cell's value
    ... send requests: the figures follow ...
    view.stop()                                                    # or: with viz.live(...): ...

A thread of the notebook's kernel takes a snapshot of the pipeline's recorded trace,
draws each view into a PNG with Agg (no pyplot, so nothing else in the notebook is
touched), and puts it in an ``ipywidgets.Image``. When the view stops, its last frame
takes the widget's place in the cell's output as plain PNGs, so a notebook saved, run by
nbclient or rendered to a static page still shows what the view showed at the end. Every event is kept by the recorder,
whatever the view does; a frame is just a picture of the trace as it is now. So a view
that cannot keep up never falls behind on events: it waits at least as long as its last
frame took to draw before drawing the next, and the frames it could not draw in between
are counted in ``skipped``.
"""

from __future__ import annotations

import functools
import inspect
import io
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from modkit.trace import Trace

if TYPE_CHECKING:
    from IPython.display import DisplayHandle, Image
    from matplotlib.figure import Figure

View = Callable[..., "Figure"]  # (trace, **kwargs) -> matplotlib Figure


@runtime_checkable
class Traced(Protocol):
    """What ``live`` needs of a pipeline (``modkit.Pipeline`` has it): its trace so far."""

    def trace(self, settle_s: float = ...) -> Trace: ...


class LiveView:
    """Redraw ``views`` of the trace that ``source()`` returns, every ``interval_s`` or slower."""

    def __init__(
        self,
        source: Callable[[], Trace],
        views: Sequence[str | View] = ("block_grid", "batch_composition"),
        interval_s: float = 0.5,
        width_px: int = 720,
        **view_kwargs: object,
    ) -> None:
        import ipywidgets as widgets

        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.source = source
        self.views = [_resolve(v) for v in views]
        self.view_kwargs = view_kwargs
        self.interval_s = interval_s
        self.frames = 0  # drawn
        self.skipped = 0  # fell due while a frame was still drawing: not drawn
        self.last_draw_s = 0.0
        self.error: BaseException | None = None
        self.images = [widgets.Image(format="png", width=width_px) for _ in self.views]
        self.status = widgets.Label("waiting for the first frame")
        self.widget = widgets.VBox([self.status, *self.images])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle: DisplayHandle | None = None  # where the widget is shown, once it is

    def start(self) -> LiveView:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="modkit-live-view", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop redrawing, after one last frame of the whole trace; where the view is shown, that
        frame replaces the widget as plain PNGs (which need no widget manager to be seen)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.error is None:
            self.draw()
        if self._handle is not None:
            from IPython.display import Image

            frames = [Image(data=image.value, format="png") for image in self.images if image.value]
            self._handle.update(_Frames(frames, self.status.value))

    def draw(self) -> None:
        """Draw one frame now, in the calling thread."""
        t0 = time.monotonic()
        trace = self.source()
        for image, view in zip(self.images, self.views, strict=True):
            image.value = render_png(view(trace, **self._kwargs_for(view)))
        self.last_draw_s = time.monotonic() - t0
        self.frames += 1
        self.status.value = (
            f"{len(trace)} events · frame {self.frames} drawn in {self.last_draw_s * 1000:.0f} ms"
            f" · {self.skipped} frames skipped"
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.draw()
            except Exception as error:  # the pipeline shut down, or a view failed: say so, stop drawing
                self.error = error
                self.status.value = f"stopped: {type(error).__name__}: {error}"
                return
            # Never poll faster than a frame draws; what fell due meanwhile is skipped, not queued.
            self.skipped += int(self.last_draw_s // self.interval_s)
            self._stop.wait(max(self.interval_s, self.last_draw_s))

    def _kwargs_for(self, view: View) -> dict[str, object]:
        accepted = inspect.signature(view).parameters
        return {k: v for k, v in self.view_kwargs.items() if k in accepted}

    def _ipython_display_(self) -> None:
        from IPython.display import display

        self._handle = display(self.widget, display_id=True)

    def __enter__(self) -> LiveView:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def live(
    pipeline: Traced | Callable[[], Trace],
    *views: str | View,
    interval_s: float = 0.5,
    width_px: int = 720,
    **view_kwargs: object,
) -> LiveView:
    """Start a ``LiveView`` of ``pipeline``'s trace (a ``Pipeline``, or any callable returning a ``Trace``).

    ``views``: names from ``modkit.viz.VIEWS`` or functions ``(trace, **kwargs) -> Figure``
    (default: the block grid and the batch composition). Keyword arguments go to every
    view that takes them (``worker_id=1``, ``max_requests=20``...).
    """
    source = functools.partial(pipeline.trace, settle_s=0) if isinstance(pipeline, Traced) else pipeline
    return LiveView(source, views or ("block_grid", "batch_composition"), interval_s, width_px, **view_kwargs).start()


def render_png(figure: Figure, dpi: int = 80) -> bytes:
    """A matplotlib Figure as PNG bytes, drawn with Agg whatever the notebook's backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


class _Frames:
    """A stopped view's last frames, shown as one output: its PNGs (one per view) and a caption."""

    def __init__(self, images: list[Image], caption: str) -> None:
        self.images, self.caption = images, caption

    def _repr_mimebundle_(self, include: object = None, exclude: object = None) -> dict[str, object]:
        import base64

        # One PNG per output is all a notebook keeps; several views become one HTML block of them.
        pngs = [base64.b64encode(image.data).decode() for image in self.images]
        text = f"live view, stopped: {self.caption}"
        if len(pngs) == 1:
            return {"image/png": pngs[0], "text/plain": text}
        tags = "".join(f'<img src="data:image/png;base64,{png}"/><br/>' for png in pngs)
        html = f"<div><p>{text}</p>{tags}</div>"
        return {"text/html": html, "image/png": pngs[0] if pngs else "", "text/plain": text}


def _resolve(view: str | View) -> View:
    if callable(view):
        return view
    from modkit.viz import VIEWS

    if view not in VIEWS:
        raise ValueError(f"no view {view!r}; views: {', '.join(sorted(VIEWS))}")
    return VIEWS[view]
