"""Component classes that tests/test_pipeline.py swaps into a running pipeline (``Pipeline.restart(..., target=)``).

They live in tests/, not in the package; the tests put this folder on the children's PYTHONPATH.
"""

from __future__ import annotations

from modkit.scheduler.output import SchedulerOutput
from modkit.worker.service import LaunchedStep, WorkerService

POISON_TOKEN = 2000  # a prompt that starts with this token id makes PoisonedWorker's step fail


class PoisonedWorker(WorkerService):
    """A real worker whose forward raises for any step that admits a prompt starting with POISON_TOKEN."""

    def _run(self, plan: SchedulerOutput, started: float) -> LaunchedStep:
        if any(new.token_ids[0] == POISON_TOKEN for new in plan.scheduled_new_reqs):
            raise RuntimeError("poisoned prompt")
        return super()._run(plan, started)
