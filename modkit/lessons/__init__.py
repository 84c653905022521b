"""Lessons you write code in: fill in a scheduler or an eviction policy, then check it against modkit's.

::

    from modkit.lessons import SchedulerSkeleton, compare_schedulers, solutions

    class MyScheduler(SchedulerSkeleton):
        def schedule_running(self, step): ...       # your code
        def allocate_or_preempt(self, request, num_new, step): ...
        def schedule_waiting(self, step): ...

    result = compare_schedulers(MyScheduler, workload=workload_from_trace(p.trace()))
    result.matched, result.first_difference      # the first step that differs, both decisions, and why
    p.swap("scheduler", MyScheduler)             # once it matches: it serves (after a drain)

``compare_schedulers`` and ``compare_eviction`` are simulations with the real objects (a
scheduler over a ``KVCacheManager``, no model; ``modkit.scheduler.simulate``). ``solutions``
holds one answer to each part, so the lesson notebook runs as it is.
"""

from modkit.lessons import solutions
from modkit.lessons.compare import (
    Comparison,
    Decision,
    Difference,
    QueueState,
    compare_eviction,
    compare_schedulers,
)
from modkit.lessons.skeleton import EvictionSkeleton, SchedulerSkeleton
from modkit.lessons.workload import Workload, WorkloadRequest, synthetic_workload, workload_from_trace

__all__ = [
    "Comparison",
    "Decision",
    "Difference",
    "EvictionSkeleton",
    "QueueState",
    "SchedulerSkeleton",
    "Workload",
    "WorkloadRequest",
    "compare_eviction",
    "compare_schedulers",
    "solutions",
    "synthetic_workload",
    "workload_from_trace",
]
