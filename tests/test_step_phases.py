"""Where a step's time goes (``modkit.trace.phases``), and the in-process engine's forwards as a
trace (``modkit.trace.inprocess``): checked on steps built by hand, on the saved trace of an
older run, on the in-process engine against a run that records nothing, and on a live pipeline
whose steps run one after the other.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_pipeline import free_ports
from waiting import wait_until

from modkit import LLM, Pipeline, SamplingParams
from modkit.trace import Trace
from modkit.trace.events import ScheduledReq, StepEvent
from modkit.trace.inprocess import record_forwards
from modkit.trace.phases import PHASES, step_phases

SAVED = Path(__file__).parent / "data" / "trace_2workers.json.gz"


def step_event(step: int, started: float, schedule_s: float, step_s: float, **timings: float) -> StepEvent:
    """A step of worker 0 with one decode; the timings not given are 0."""
    return StepEvent(
        worker_id=0,
        step=step,
        started=started,
        step_s=step_s,
        schedule_s=schedule_s,
        forward_s=timings.get("forward_s", 0.0),
        sample_s=timings.get("sample_s", 0.0),
        scheduled=[ScheduledReq("r", 1, "decode", 10 + step, 0)],
        preempted={},
        waiting={},
        num_waiting=0,
        num_running=1,
        token_budget=64,
        tokens_used=1,
        kv_usage=0.1,
        prefix_cache_queries=0,
        prefix_cache_hits=0,
        kv_s=timings.get("kv_s", 0.0),
        update_s=timings.get("update_s", 0.0),
    )


def test_phases_split_each_step_and_add_up_to_the_period_between_steps() -> None:
    # Two steps one after the other: schedule 2 ms (1 of them KV), sent at t=100.002, back after
    # 10 ms (forward 6, sample 1: transport 3), update 1 ms, 0.5 ms of loop, the next schedule.
    first = step_event(0, 100.002, 0.002, 0.010, forward_s=0.006, sample_s=0.001, kv_s=0.001, update_s=0.001)
    second = step_event(1, 100.0155, 0.002, 0.010, forward_s=0.006, sample_s=0.001, update_s=0.001)
    phases = step_phases(Trace([second, first], {"t0": 100.0}))  # out of order: sorted by step
    assert list(phases.columns) == [
        "worker_id",
        "step",
        "num_seqs",
        "num_prompt_tokens",
        "tokens_used",
        *PHASES,
        "total",
        "period",
    ]
    row = phases.iloc[0]
    expected = {"schedule": 0.001, "kv": 0.001, "forward": 0.006, "sample": 0.001, "transport": 0.003, "update": 0.001}
    assert row[list(PHASES)].to_dict() == pytest.approx(expected)
    assert row.total == pytest.approx(0.013) and row.period == pytest.approx(0.0135)
    assert phases.period.isna().tolist() == [False, True], "a worker's last step has no next one"


def test_a_trace_saved_before_kv_and_update_timings_loads_with_them_zero() -> None:
    trace = Trace.load(SAVED)
    steps = trace.steps
    assert len(steps) > 0 and (steps.kv_s == 0).all() and (steps.update_s == 0).all()
    phases = step_phases(trace)
    assert len(phases) == len(steps[steps.failed.isna()])
    assert (phases.kv == 0).all()
    ran = steps[steps.failed.isna()].sort_values(["worker_id", "step"]).reset_index(drop=True)
    assert (phases.transport == ran.step_s - ran.forward_s - ran.sample_s).all()
    assert phases.groupby("worker_id").period.apply(lambda p: p.isna().sum()).tolist() == [1, 1]


def test_recording_forwards_of_the_in_process_engine_changes_no_output() -> None:
    llm = LLM(num_kv_blocks=64, enable_prefix_caching=False)  # the second run computes every prompt again
    prompts = ["Hello!", "What does a cow say?", "Count to five."]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    plain = llm.generate(prompts, params, use_tqdm=False)
    executor, steps_before = llm.engine.executor, llm.stats()["num_steps"]
    with record_forwards(llm) as recording:
        recorded = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.executor is executor, "the engine's own executor is back"
    assert [o.outputs[0].token_ids for o in recorded] == [o.outputs[0].token_ids for o in plain]
    forwards = recording.trace().forwards
    assert len(forwards) == llm.stats()["num_steps"] - steps_before
    assert list(forwards.step) == sorted(forwards.step)
    num_prompt_tokens = sum(len(o.prompt_token_ids) for o in recorded)
    # Every prompt token once; then one decode a step per output token but the last (it is sampled, not fed).
    assert forwards.num_tokens.sum() == num_prompt_tokens + 3 * (6 - 1)
    assert forwards.num_sampled.sum() == 3 * 6
    assert (forwards.forward_s > 0).all() and (forwards.sample_s > 0).all()
    assert (forwards.start.diff().dropna() > 0).all()


@pytest.mark.slow
def test_sequential_steps_of_a_pipeline_are_covered_by_their_phases() -> None:
    with Pipeline.launch(async_scheduling=False, progress=False, **free_ports()) as pipeline:
        client = pipeline.client()

        def ask(i: int) -> object:
            return client.completions.create(
                model=pipeline.model_name,
                prompt=f"Question {i}:",
                max_tokens=12,
                temperature=0,
                extra_body={"ignore_eos": True},
            )

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(ask, range(4)))
        wait_until(lambda: len(pipeline.trace(settle_s=0).steps) >= 12, 10)
        trace = pipeline.trace()
    phases, steps = step_phases(trace), trace.steps
    # Each admission asks the KV cache manager for blocks: a round trip, inside schedule().
    admitting = steps[steps.num_prompt_tokens > 0]  # short prompts: a prompt step admits its requests
    assert len(admitting) > 0 and (admitting.kv_s > 0).all() and (steps.kv_s <= steps.schedule_s).all()
    assert (steps.update_s > 0).all()
    # One step at a time: the next schedule() starts after this step's update, so the phases never
    # exceed the period, and the scheduler's loop between the two is a small part of it.
    busy = phases.dropna(subset=["period"])
    assert (busy.total <= busy.period + 1e-4).all()
    assert (busy.total / busy.period).median() > 0.8, busy[["total", "period"]]
