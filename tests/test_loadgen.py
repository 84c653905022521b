"""The open-loop load generator (``modkit.loadgen``): its arrival schedule, its summary and knee,
and a real run through a pipeline's OpenAI API, checked against the pipeline's own trace."""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics

import pytest
from test_pipeline import free_ports
from waiting import wait_until

from modkit import Pipeline
from modkit.loadgen import RequestResult, knee, open_loop, poisson_send_times, summarize


def test_poisson_arrivals_keep_one_pattern_at_every_rate() -> None:
    slow, fast = poisson_send_times(2000, 5.0, seed=3), poisson_send_times(2000, 20.0, seed=3)
    assert slow[0] == 0.0 and slow == sorted(slow)
    assert fast == pytest.approx([t / 4 for t in slow]), "the same gaps, scaled by the rate"
    gaps = [b - a for a, b in itertools.pairwise(slow)]
    assert statistics.mean(gaps) == pytest.approx(1 / 5.0, rel=0.1)
    assert statistics.stdev(gaps) == pytest.approx(1 / 5.0, rel=0.15), "exponential: std = mean"
    assert poisson_send_times(2000, 5.0, seed=4) != slow
    assert poisson_send_times(3, math.inf) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="rate must be > 0"):
        poisson_send_times(3, 0.0)


def test_a_rate_is_summarized_in_vllms_names() -> None:
    results = [
        RequestResult(0.0, 0.010, 0.050, 5, 5, [0.01] * 4),
        RequestResult(0.5, 0.030, 0.110, 5, 3, [0.04, 0.04]),  # a chunk of several tokens: one gap
    ]
    row = summarize(2.0, results, duration=1.0, cpu_s=0.25)
    assert row["request_rate"] == 2.0 and row["completed"] == 2 and row["total_output_tokens"] == 10
    assert row["request_throughput"] == 2.0 and row["output_throughput"] == 10.0 and row["client_cpu_share"] == 0.25
    assert row["median_ttft_ms"] == pytest.approx(20.0) and row["mean_e2el_ms"] == pytest.approx(80.0)
    assert row["median_itl_ms"] == pytest.approx(10.0) and row["p99_itl_ms"] == pytest.approx(40.0)
    assert row["mean_tpot_ms"] == pytest.approx(1e3 * (0.010 + 0.020) / 2)
    assert summarize(math.inf, results, 1.0)["request_rate"] == "inf"


def test_the_knee_is_where_throughput_stops_following_the_offered_rate() -> None:
    def row(rate: float | str, achieved: float) -> dict[str, object]:
        return {"request_rate": rate, "request_throughput": achieved}

    assert knee([row(1.0, 0.95), row(2.0, 1.9)]) is None, "it kept up everywhere"
    assert knee([row(1.0, 0.95), row(2.0, 1.9), row(4.0, 2.6), row(8.0, 2.5)]) == 2.6
    assert knee([row(1.0, 1.0), row("inf", 3.0)]) == 3.0, "all at once is all it can do"
    assert knee([]) is None


@pytest.mark.slow
def test_an_open_loop_run_through_a_pipeline_matches_its_trace() -> None:
    with Pipeline.launch(progress=False, **free_ports()) as pipeline:
        prompts = [f"Question {i}: tell me something." for i in range(6)]

        async def from_a_running_loop() -> tuple[list[RequestResult], float]:
            # As a Jupyter kernel calls it: an event loop already runs in this thread.
            return open_loop(f"{pipeline.url}/v1", pipeline.model_name, prompts, 20.0, 4, seed=1)

        results, duration = asyncio.run(from_a_running_loop())
        wait_until(lambda: pipeline.trace(settle_s=0).requests.finish_reason.notna().sum() >= 6, 10)
        trace = pipeline.trace()
        req_ids = set(trace.requests.dropna(subset=["finish_reason"]).req_id)
    assert len(results) == 6 and len(req_ids) == 6
    assert [r.output_tokens for r in results] == [4] * 6, "ignore_eos: exactly max_tokens each"
    sent = [r.sent_s for r in results]
    expected = poisson_send_times(6, 20.0, seed=1)
    assert sent == sorted(sent) and all(s >= e for s, e in zip(sent, expected, strict=True))
    for r in results:
        assert 0 < r.ttft_s <= r.e2e_s and r.sent_s + r.e2e_s <= duration
        assert 1 <= r.num_chunks <= 4 and len(r.itl_s) == r.num_chunks - 1
    assert trace.requests.num_output_tokens.sum() == 24
