"""One swap mechanism for every swappable part: trial, guard, rollback.

Five parts of a running pipeline can be swapped (``Pipeline.swap``): the scheduling policy,
the eviction policy, the routing policy, the sampler and the attention backend. All five go
through the same three stages. A component supplies only what is its own: the probe its
trial runs, a guard class for its interface, and how to install an implementation::

    swap(spec) --resolve--> candidate --trial(candidate, probe)--> raises: refused, nothing changed
                                              | passes
                                              v
        install a Guarded(candidate, fallback=the one in charge)      owner._swapped_in: Swapped(error=None)
                                              | a call into the candidate raises
                                              v
        that call is answered by the fallback; guard.error says why;  owner puts the fallback back:
        every later call goes to the fallback                         owner._rolled_back: Swapped(error),
                                                                      health's last_swap_error

1. **Trial** (``trial``). The candidate runs on a probe before it goes live: a policy on the
   requests it will order, a sampler on random logits, an attention backend against the one
   in charge. Whatever the probe raises goes back to the caller unchanged, and nothing has
   been installed.
2. **Guard** (``Guarded``). A guard implements the part's own interface and sends each call
   through ``guarded``: the code that uses the part (the scheduler, the block pool, the
   model's layers) neither knows nor checks. A call that raises, or returns an answer the
   guard's check refuses, is answered by the fallback, so the step that made it goes on; from
   then on the guard is failed and only the fallback answers.
3. **Rollback** (``SwapOwner``). The service that swapped the part notices the failed guard
   (after the unit of work it serves: a step, a call, a decision, or at once through
   ``on_failure``), puts the fallback back wherever the candidate was installed, and
   publishes a ``Swapped`` event with the error, which its health shows as ``last_swap_error``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar, cast

if TYPE_CHECKING:
    from modkit.trace.events import Swapped

T = TypeVar("T")
R = TypeVar("R")


def trial(candidate: T, probe: Callable[[T], R]) -> R:
    """Run the component's ``probe`` on a candidate before it goes live; returns what the probe returns.

    The probe raises to refuse the candidate: the error reaches the caller of the swap as it
    was raised (its type and traceback say what went wrong), and nothing has changed yet.
    """
    return probe(candidate)


class Guarded(Generic[T]):
    """The base of every guard: a ``candidate`` live on trial, and the ``fallback`` it replaced.

    A guard subclasses this and the part's interface (``GuardedPolicy(Guarded[SchedulingPolicy],
    SchedulingPolicy)``), and implements each method of the interface with ``guarded``.
    ``on_failure``, if given, is called once, when the candidate first fails, before the
    fallback answers: for an owner that must put the fallback back at once (the block pool).
    """

    def __init__(self, candidate: T, fallback: T, on_failure: Callable[[Guarded[T]], None] | None = None) -> None:
        self.candidate, self.fallback = candidate, fallback
        self.on_failure = on_failure
        self.error: str | None = None  # why the candidate was put aside; None while it serves

    @property
    def failed(self) -> bool:
        return self.error is not None

    def guarded(self, method: str, attempt: Callable[[T], R], fallback_attempt: Callable[[T], R] | None = None) -> R:
        """``attempt(candidate)``; once that has raised, ``attempt(fallback)``, for this call and every later one.

        ``attempt`` also checks the answer and raises if it is impossible (a victim that is
        not running, token ids outside the vocabulary): a wrong answer counts as a failure.
        ``fallback_attempt`` replaces ``attempt`` for the fallback where the two differ (an
        eviction policy's fallback is filled from the pool's ground truth when it takes over,
        which already counts the call that failed).
        """
        if self.error is None:
            try:
                return attempt(self.candidate)
            except Exception as error:
                self.error = f"{type(error).__name__} in {method}(): {error}"
                if self.on_failure is not None:
                    self.on_failure(self)
        return (fallback_attempt or attempt)(self.fallback)


def in_charge(impl: T) -> T:
    """What a part runs now: a guard's candidate, or ``impl`` itself. What a new swap keeps as its fallback."""
    return cast(T, impl.candidate) if isinstance(impl, Guarded) else impl


def failure(impl: object) -> str | None:
    """Why the guard ``impl`` failed; None if it has not, or if ``impl`` is not a guard."""
    return impl.error if isinstance(impl, Guarded) else None


def put_back(impl: T) -> T:
    """What takes over when a swap is rolled back: a guard's fallback, or ``impl`` itself if it is not a guard."""
    return cast(T, impl.fallback) if isinstance(impl, Guarded) else impl


class SwapOwner(ABC):
    """Mixin for a service that swaps a part: the ``Swapped`` events, and ``last_swap_error`` for its health.

    The service keeps the names of what runs and what ran before (its health shows them);
    this keeps what every owner does the same way when a swap happens or is undone.
    """

    last_swap_error: str | None  # why the last swapped-in implementation was taken out; None after a swap

    @abstractmethod
    def _publish_swapped(self, event: Swapped) -> None:
        """Publish ``event`` on the service's own topic (``swap.<component>``)."""

    def _swapped_in(self, component: str, implementation: str, previous: str) -> None:
        """``implementation`` passed its trial and took over from ``previous``."""
        self.last_swap_error = None
        self._publish_swapped(_swapped(component, implementation, previous, None))

    def _rolled_back(self, component: str, implementation: str, failed: str, error: str) -> None:
        """``failed`` raised (``error``): ``implementation``, the one it replaced, is back in charge."""
        self.last_swap_error = error
        self._publish_swapped(_swapped(component, implementation, failed, error))


def _swapped(component: str, implementation: str, previous: str, error: str | None) -> Swapped:
    # NOTE: imported here, not at the top: the guards above are imported by core modules (the
    # block pool, the policies, the sampler) that must not pull in the event stream and, with
    # it, ZeroMQ; only the services, which publish, get here.
    from modkit.trace.events import Swapped

    return Swapped(time.time(), component, implementation, previous, error)
