"""The scheduler: V1-style token-budget scheduling with chunked prefill and preemption."""

from modkit.scheduler.output import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    ScheduledEntry,
    SchedulerOutput,
    StepRecord,
)
from modkit.scheduler.policies import (
    FCFSPolicy,
    PriorityPolicy,
    SchedulingPolicy,
    get_policy,
    policies,
    register_policy,
)
from modkit.scheduler.scheduler import Scheduler

__all__ = [
    "CachedRequestData",
    "EngineCoreOutput",
    "FCFSPolicy",
    "ModelRunnerOutput",
    "NewRequestData",
    "PriorityPolicy",
    "ScheduledEntry",
    "Scheduler",
    "SchedulerOutput",
    "SchedulingPolicy",
    "StepRecord",
    "get_policy",
    "policies",
    "register_policy",
]
