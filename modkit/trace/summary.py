"""``TraceSummary``: the handful of numbers a serving benchmark reports, read off a ``Trace``.

::

    trace.summary()
    TraceSummary(40 requests, 1,280 output tokens in 12.15 s)
      output throughput  105.4 tok/s
      TTFT               p50 27.1 ms   p99 126.3 ms
      inter-token        p50 4.2 ms    p99 23.9 ms
      preemptions        0
      prefix-hit rate    0.0%

The same numbers for a live trace and a simulated one (``modkit.sim``), so a prediction
and a measurement compare field by field. Latencies are the frontend's view, from the
trace's events: TTFT from ``RequestArrived`` to the first ``TokensOut`` of a request,
inter-token latency the gaps between its later ``TokensOut`` (as vLLM counts ITL, a
message of several tokens is one gap).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from modkit.trace.trace import Trace


@dataclass(frozen=True, slots=True)
class TraceSummary:
    num_requests: int  # requests that sent at least one token
    num_output_tokens: int
    duration_s: float  # first arrival to the last token
    output_throughput: float  # output tokens per second over duration_s
    ttft_p50_s: float  # NaN when no request sent a token
    ttft_p99_s: float
    itl_p50_s: float  # NaN when no request sent a second token
    itl_p99_s: float
    num_preemptions: int
    prefix_hit_rate: float  # prefix-cache hits over queries, in tokens

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def __repr__(self) -> str:
        def ms(seconds: float) -> str:
            return "-" if math.isnan(seconds) else f"{1e3 * seconds:.1f} ms"

        return "\n".join(
            [
                f"TraceSummary({self.num_requests} requests, {self.num_output_tokens:,} output tokens"
                f" in {self.duration_s:.2f} s)",
                f"  output throughput  {self.output_throughput:.1f} tok/s",
                f"  TTFT               p50 {ms(self.ttft_p50_s):<10} p99 {ms(self.ttft_p99_s)}",
                f"  inter-token        p50 {ms(self.itl_p50_s):<10} p99 {ms(self.itl_p99_s)}",
                f"  preemptions        {self.num_preemptions}",
                f"  prefix-hit rate    {100 * self.prefix_hit_rate:.1f}%",
            ]
        )


def summarize(trace: Trace) -> TraceSummary:
    """The summary of ``trace`` (see the module docstring for what each number counts)."""
    requests = trace.requests.dropna(subset=["first_token"])
    tokens = trace.tokens
    num_output_tokens = int(tokens["num_tokens"].sum()) if len(tokens) else 0
    duration = float(tokens["t"].max() - requests["arrival"].min()) if len(requests) else 0.0
    steps = trace.steps
    return TraceSummary(
        num_requests=len(requests),
        num_output_tokens=num_output_tokens,
        duration_s=duration,
        output_throughput=num_output_tokens / duration if duration > 0 else 0.0,
        ttft_p50_s=_percentile(requests["ttft"], 50),
        ttft_p99_s=_percentile(requests["ttft"], 99),
        itl_p50_s=_percentile(tokens["itl"], 50),
        itl_p99_s=_percentile(tokens["itl"], 99),
        num_preemptions=int(steps["num_preempted"].sum()) if len(steps) else 0,
        prefix_hit_rate=trace.prefix_hit_rate(),
    )


def _percentile(values: object, q: float) -> float:
    array = np.asarray(values, dtype=float)
    array = array[~np.isnan(array)]
    return float(np.percentile(array, q)) if len(array) else math.nan
