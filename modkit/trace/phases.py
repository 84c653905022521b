"""Where a step's time goes: the scheduler's and the worker's timings of each step, side by side.

With sequential stepping (``PipelineConfig.async_scheduling=False``) one step of one worker
is, in order::

    scheduler   schedule()                  schedule_s  (of it, kv_s: waiting for the KV cache manager)
                 | the plan, over ZeroMQ ------------------------------------------+
    worker      inputs + model forward      forward_s                              | step_s
                sampling                    sample_s                               |
                 | the sampled ids, over ZeroMQ -----------------------------------+
    scheduler   update_from_output()        update_s

so ``schedule_s + step_s + update_s`` is the step, and the part of ``step_s`` the worker
did not spend computing (``step_s - forward_s - sample_s``) is the *transport*: encoding,
the two hops, each process waking up to read its message. Nothing else runs between two
steps of one worker but the scheduler's loop, so the phases of a step add up to the time
from its ``schedule()`` to the next one's (``period``).

With async scheduling (the default) step N+1 is planned and sent while step N runs: its
``step_s`` then also holds the time its plan waited at the worker (counted as transport
here), and the phases of consecutive steps overlap: they add up to more than the period.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modkit.trace.trace import Trace

if TYPE_CHECKING:
    import pandas as pd

# In the order they happen; "kv" is the part of schedule() spent waiting for the KV cache manager.
PHASES = ("schedule", "kv", "forward", "sample", "transport", "update")


def step_phases(trace: Trace) -> pd.DataFrame:
    """One row per step that ran (failed steps left out), in seconds.

    Columns: ``worker_id``, ``step``, ``num_seqs``, ``num_prompt_tokens``, ``tokens_used``, each of ``PHASES``
    (``schedule`` without its KV round trips, which are ``kv``), ``total`` (their sum), and
    ``period``: from this step's ``schedule()`` to the next one's of the same worker (NaN
    for a worker's last step, and longer than ``total`` when the worker sat idle between).
    Steps recorded before ``kv_s`` and ``update_s`` existed show 0.0 for them.
    """
    import pandas as pd

    columns = ["worker_id", "step", "num_seqs", "num_prompt_tokens", "tokens_used", *PHASES, "total", "period"]
    steps = trace.steps
    if len(steps) == 0:
        return pd.DataFrame(columns=columns)
    steps = steps[steps.failed.isna()].sort_values(["worker_id", "step"])
    frame = steps[columns[:5]].copy()
    frame["schedule"] = steps.schedule_s - steps.kv_s
    frame["kv"] = steps.kv_s
    frame["forward"] = steps.forward_s
    frame["sample"] = steps.sample_s
    frame["transport"] = steps.step_s - steps.forward_s - steps.sample_s
    frame["update"] = steps.update_s
    frame["total"] = frame[list(PHASES)].sum(axis=1)
    planned = steps.start - steps.schedule_s  # ``start`` is when the plan left, after schedule()
    frame["period"] = planned.groupby(steps.worker_id).shift(-1) - planned
    return frame.reset_index(drop=True)[columns]
