"""Scheduling policies: who is admitted first, and who is preempted when blocks run out.

The scheduler's mechanics (budget, blocks, chunking, preemption by recompute) are the same
for every policy; a policy only orders requests. Register new ones with
``register_policy`` and pass the name to the scheduler.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

from modkit.guard import Guarded
from modkit.registry import Registry
from modkit.request import Request


class SchedulingPolicy(ABC):
    name: ClassVar[str]
    # True when admission keys change with time (aging): the scheduler then re-sorts the
    # waiting queue before every step instead of only when a request joins it.
    reorders_over_time: ClassVar[bool] = False
    # "Now", for a policy that ages requests (compared with request.arrival_time): the wall
    # clock when serving; a simulation sets its own clock on its instance (modkit.sim).
    clock: Callable[[], float] = time.time

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


@register_policy("sjf")
class ShortestJobFirstPolicy(SchedulingPolicy):
    """Shortest job first: the waiting request with the fewest tokens to compute goes first.

    Short prompts no longer wait behind long ones, which cuts the mean time to first token;
    but a steady flow of short requests would keep a long one waiting forever. The guard
    against that starvation: a request that has waited ``max_wait_s`` goes ahead of every
    request that has not, oldest first. Preemption takes the request with the most tokens
    still to generate (it would hold its blocks longest), ties to the latest arrival.
    """

    reorders_over_time = True
    max_wait_s: ClassVar[float] = 5.0

    def admission_key(self, request: Request) -> tuple[float, ...]:
        if self.clock() - request.arrival_time >= self.max_wait_s:
            return (0, request.arrival_time)
        return (1, request.num_tokens - request.num_computed_tokens, request.arrival_time)

    def pick_victim(self, running: list[Request]) -> Request:
        return max(running, key=lambda r: (r.max_tokens - r.num_output_tokens, r.arrival_time))


class GuardedPolicy(Guarded[SchedulingPolicy], SchedulingPolicy):
    """A policy swapped in live, with the one it replaced as its fallback (``modkit.guard``).

    If the new policy raises, or picks a victim that is not running, the fallback answers
    (the scheduler never stops halfway through a step) and ``error`` says why: the
    scheduler's owner then puts the fallback back on every worker.
    """

    def __init__(self, candidate: SchedulingPolicy, fallback: SchedulingPolicy) -> None:
        super().__init__(candidate, fallback)
        # Either may be the one answering, so re-sort over time if either's keys age.
        self.reorders_over_time = candidate.reorders_over_time or fallback.reorders_over_time  # type: ignore[misc]

    def admission_key(self, request: Request) -> tuple[float, ...]:
        return self.guarded("admission_key", lambda p: tuple(p.admission_key(request)))

    def pick_victim(self, running: list[Request]) -> Request:
        return self.guarded("pick_victim", lambda p: _running_victim(p.pick_victim(running), running))


def _running_victim(victim: Request, running: list[Request]) -> Request:
    if victim not in running:
        raise ValueError(f"returned {victim!r}, not one of the running requests")
    return victim
