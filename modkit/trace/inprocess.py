"""The in-process engine's forwards as a trace: the same ``ForwardEvent`` a worker process publishes.

``LLM`` and a worker process run one ``StepExecutor``, so the same code times their
forwards and their sampling. While ``record_forwards(llm)`` is open, each step ``llm``
launches leaves a ``ForwardEvent`` (worker 0); ``.trace().forwards`` is then the frame a
pipeline's ``trace().forwards`` is, and the two engines compare column for column::

    with record_forwards(llm) as recording:
        llm.generate(prompts, params)
    recording.trace().forwards          # worker_id, step, start, forward_s, sample_s, num_tokens ...

Not imported by ``modkit.trace`` itself: that package is imported by every pipeline process,
and this module brings the worker (and torch) with it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import msgspec

from modkit.scheduler.output import ModelRunnerOutput, SchedulerOutput
from modkit.trace.events import ForwardEvent, PipelineEvent
from modkit.trace.trace import Trace
from modkit.worker.executor import LaunchedStep, StepExecutor

if TYPE_CHECKING:
    from modkit.engine.llm import LLM


class ForwardRecording:
    """The ``ForwardEvent`` of each step launched while the recording was open."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.events: list[PipelineEvent] = []

    def trace(self) -> Trace:
        """A snapshot as a ``Trace`` (only ``forwards`` has rows), times from when recording began."""
        return Trace(list(self.events), {"t0": self.t0, "engine": "LLM"})


class _RecordingExecutor(StepExecutor):
    """The engine's executor, unchanged but for a ``ForwardEvent`` per launched step.

    It shares the original's table of sampling states, so requests in flight when the
    recording opens or closes carry on as if nothing happened.
    """

    def __init__(self, inner: StepExecutor, recording: ForwardRecording) -> None:
        super().__init__(inner.worker, inner.sampler, inner.eos_token_ids, inner.grammars)
        self.states = inner.states
        self.recording = recording
        self._pending: dict[int, int] = {}  # step -> index of its event, until the step is finished

    def launch(self, plan: SchedulerOutput) -> LaunchedStep:
        step = super().launch(plan)
        event = ForwardEvent(
            worker_id=0,
            step=plan.step,
            started=step.started,
            forward_s=step.forward_s,
            sample_s=step.sample_s,
            num_tokens=plan.total_num_scheduled_tokens,
            num_seqs=len(plan.num_scheduled_tokens),
            num_sampled=len(step.req_ids),
            num_constrained=sum(1 for r in step.req_ids if self.states[r].grammar is not None),
            num_threads=step.num_threads,
        )
        self.recording.events.append(event)
        self._pending[plan.step] = len(self.recording.events) - 1
        return step

    def finish(self, step: LaunchedStep) -> ModelRunnerOutput:
        """As the worker process counts it: the wait for the sampled ids belongs to sampling."""
        t0 = time.perf_counter()
        output = super().finish(step)
        index = self._pending.pop(step.plan.step, None)
        if index is not None and index < len(self.recording.events):
            event = self.recording.events[index]
            assert isinstance(event, ForwardEvent)
            waited = time.perf_counter() - t0
            self.recording.events[index] = msgspec.structs.replace(event, sample_s=event.sample_s + waited)
        return output


@contextmanager
def record_forwards(llm: LLM) -> Iterator[ForwardRecording]:
    """Record the forward timings of every step ``llm`` launches inside the ``with`` block.

    ``llm.engine.executor`` is a recording subclass meanwhile, and the original again after
    (with the sampler in charge then, if one was swapped in meanwhile).
    """
    engine = llm.engine
    inner = engine.executor
    recording = ForwardRecording()
    recorder = _RecordingExecutor(inner, recording)
    engine.executor = recorder
    try:
        yield recording
    finally:
        inner.sampler = recorder.sampler
        engine.executor = inner
