"""Scheduling policies: who is admitted first, and who is preempted when blocks run out.

The scheduler's mechanics (budget, blocks, chunking, preemption by recompute) are the same
for every policy; a policy only orders requests. Register new ones with
``register_policy`` and pass the name to the scheduler.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from modkit.registry import Registry
from modkit.request import Request


class SchedulingPolicy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def admission_key(self, request: Request) -> tuple[float, ...]:
        """Waiting requests are admitted in increasing key order."""

    @abstractmethod
    def pick_victim(self, running: list[Request]) -> Request:
        """The running request to preempt when a block is needed and none is free."""


POLICIES: Registry[SchedulingPolicy] = Registry("scheduling policy")
register_policy = POLICIES.register


def get_policy(name: str) -> SchedulingPolicy:
    return POLICIES.get(name)()


def policies() -> list[str]:
    return POLICIES.names()


@register_policy("fcfs")
class FCFSPolicy(SchedulingPolicy):
    """First come, first served. The latest arrival is preempted first (vLLM's FCFS)."""

    def admission_key(self, request: Request) -> tuple[float, ...]:
        return (request.arrival_time,)

    def pick_victim(self, running: list[Request]) -> Request:
        return max(running, key=lambda r: r.arrival_time)


@register_policy("priority")
class PriorityPolicy(SchedulingPolicy):
    """Lower ``priority`` first, ties by arrival; the largest (priority, arrival) is preempted first."""

    def admission_key(self, request: Request) -> tuple[float, ...]:
        return (request.priority, request.arrival_time)

    def pick_victim(self, running: list[Request]) -> Request:
        return max(running, key=lambda r: (r.priority, r.arrival_time))
