"""A component's ``/stats`` as Prometheus text, for the ``/metrics`` of its HTTP port.

``/stats`` is a JSON object of counters and gauges; ``/metrics`` shows the same numbers to
Prometheus, as untyped ``modkit_<key>`` samples labelled with the ``component``:

- a number or boolean is a sample;
- a nested object adds its keys to the name (``loop.busy_s`` -> ``modkit_loop_busy_s``);
- a list of objects (the scheduler's ``workers``, the KV cache manager's ``pools``) adds
  a label with the item's index (``modkit_workers_num_steps{worker="0"}``);
- strings are left out.

Untyped, because ``/stats`` does not say which keys only grow; the frontend's ``/metrics``
adds vLLM's typed metrics on top (``modkit.frontend.metrics``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric, UnknownMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format
_Samples = dict[str, list[tuple[dict[str, str], float]]]  # name -> (labels, value) rows


def stats_metrics(component: str, stats: Mapping[str, Any]) -> Iterator[Metric]:
    """``stats`` as ``modkit_*`` metric families (see the module docstring)."""
    samples: _Samples = {}
    _flatten(stats, "modkit", {"component": component}, samples)
    for name, rows in samples.items():
        metric = UnknownMetricFamily(
            name, f"{component} /stats: {name.removeprefix('modkit_')}", labels=list(rows[0][0])
        )
        for labels, value in rows:
            metric.add_metric(list(labels.values()), value)
        yield metric


def _flatten(value: Any, name: str, labels: dict[str, str], out: _Samples) -> None:
    if isinstance(value, bool | int | float):
        out.setdefault(name, []).append((labels, float(value)))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(item, f"{name}_{_safe(str(key))}", labels, out)
    elif isinstance(value, list) and value and all(isinstance(item, Mapping) for item in value):
        label = name.rsplit("_", 1)[-1].removesuffix("s") or "index"  # "workers" -> worker="0", ...
        for i, item in enumerate(value):
            _flatten(item, name, {**labels, label: str(i)}, out)


def _safe(text: str) -> str:
    """A key as part of a metric name: letters, digits and underscores."""
    return "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in text)


class _Fixed:
    """A collector of metrics already built."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)


def render_stats(component: str, stats: Mapping[str, Any]) -> bytes:
    """``stats`` in Prometheus' text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(stats_metrics(component, stats))))
    return bytes(generate_latest(registry))
