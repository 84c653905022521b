"""Component classes that tests/test_pipeline.py swaps into a running pipeline (``Pipeline.restart(..., target=)``).

They live in tests/, not in the package; the tests put this folder on the children's PYTHONPATH.
"""

from __future__ import annotations

from typing import Any

from modkit.scheduler.output import SchedulerOutput
from modkit.worker.executor import LaunchedStep, StepExecutor
from modkit.worker.service import WorkerService

POISON_TOKEN = 2000  # a prompt that starts with this token id makes PoisonedWorker's step fail


class PoisonedExecutor(StepExecutor):
    """The real step executor, except that a step admitting a prompt starting with POISON_TOKEN raises."""

    def launch(self, plan: SchedulerOutput) -> LaunchedStep:
        if any(new.token_ids[0] == POISON_TOKEN for new in plan.scheduled_new_reqs):
            raise RuntimeError("poisoned prompt")
        return super().launch(plan)


class PoisonedWorker(WorkerService):
    """A real worker whose steps run on a ``PoisonedExecutor``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.executor = PoisonedExecutor(self.worker, self.executor.sampler, self.executor.eos_token_ids)
