"""The scheduler process's side of a swap: the scheduling policy, and the whole scheduler after a drain.

``SchedulerService`` takes this mixin, so its own file keeps the step loop and its messages.
The mechanism is ``modkit.guard``: a new policy is tried on every queued and running
request (``try_scheduling_policy``), then runs on every worker's scheduler inside a
``GuardedPolicy``; if it fails in a step, that step gets the old policy's answer and the old
policy comes back on every worker once the step is planned (``_check_swapped_policy``).

A whole scheduler is swapped only when no request is unfinished (``Pipeline.swap`` drains
first): ``"modkit"``, ``"vllm"`` (vLLM's own, ``modkit.vllm_v1``), or a subclass of modkit's
``Scheduler`` named by import path or sent by value, signed like a policy (e.g. one written in
a notebook from ``modkit.lessons.SchedulerSkeleton``). Such a class is tried first on a small
simulated workload in a scratch KV cache manager (``modkit.scheduler.simulate.try_scheduler``):
it must finish every request there, keep its invariants and the promises a plan makes. While
it serves, its ``schedule()`` is guarded (``_FallsBack``): if it raises, or plans what a plan
must not (``check_plan``), modkit's own ``Scheduler`` takes over on every worker. It takes the
requests as a preemption would (blocks freed, outputs kept, recomputed when readmitted): the
failed step becomes an empty one that tells the worker to drop them, and ``/health`` shows
``last_swap_error``. Its ``update_from_output`` is modkit's and is not guarded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from modkit.guard import SwapOwner, failure, in_charge, put_back, trial
from modkit.scheduler.output import SchedulerOutput
from modkit.scheduler.policies import POLICIES, GuardedPolicy, SchedulingPolicy
from modkit.scheduler.scheduler import Scheduler
from modkit.scheduler.simulate import check_plan, try_scheduler
from modkit.scheduler.step import StepDraft
from modkit.swap import ImplSpec, resolve
from modkit.trace.events import Swapped

if TYPE_CHECKING:
    from modkit.scheduler.slots import WorkerSlot
    from modkit.trace.events import EventPublisher
    from modkit.transport import RpcClient

SCHEDULERS = ("modkit", "vllm")  # whole schedulers by name, swapped only after a drain (see _swap_scheduler)


def try_scheduling_policy(policy: SchedulingPolicy, schedulers: Iterable[Scheduler]) -> None:
    """The trial: a dry run on what the policy will decide about; raises if it cannot.

    It orders every waiting request and picks a victim among the running ones, which must be
    one of them. Nothing is changed.
    """
    for scheduler in schedulers:
        for request in scheduler.waiting:
            policy.admission_key(request)
        running = list(scheduler.running)
        if running and policy.pick_victim(running) not in running:
            raise ValueError(f"{type(policy).__name__}.pick_victim returned a request that is not running")


class _FallsBack(Scheduler):
    """Put in front of a swapped-in ``Scheduler`` subclass (``guarded``): a ``schedule()`` that raises,
    or plans what it must not (``check_plan``), is answered by ``fall_back``, which puts modkit's
    own scheduler in charge and returns that step's plan."""

    fall_back: Callable[[Scheduler, str], SchedulerOutput]  # set by the owner on every instance

    def schedule(self) -> SchedulerOutput:
        try:
            plan = super().schedule()
            problems = check_plan(self, plan)
            if problems:
                raise ValueError("its plan breaks the scheduler's promises: " + "; ".join(problems))
        except Exception as error:
            return self.fall_back(self, f"{type(error).__name__} in schedule(): {error}")
        return plan


def guarded(cls: type[Scheduler]) -> type[Scheduler]:
    """``cls`` with ``_FallsBack`` in front: the class a swap installs (``cls``'s own name, for health)."""
    return type(cls.__name__, (_FallsBack, cls), {"__qualname__": cls.__qualname__, "__module__": cls.__module__})


def take_over(failed: Scheduler, limits: tuple[int, int, int], why: str) -> tuple[Scheduler, dict[str, str]]:
    """modkit's ``Scheduler`` over ``failed``'s KV cache manager, with every request of ``failed`` waiting
    in it, taken as a preemption takes them (blocks freed, outputs kept); and why each was taken."""
    kv = failed.kv
    with contextlib.suppress(RuntimeError):  # forget admissions a failed step prepared and did not claim
        kv.prepare_admissions([], 0)
    fallback = Scheduler(kv, *limits, in_charge(failed.policy))
    fallback.step_count, fallback.num_preemptions = failed.step_count, failed.num_preemptions
    fallback.finished_req_ids = set(failed.finished_req_ids)  # the worker has not been told of these yet
    taken = sorted(failed.requests.values(), key=lambda r: r.arrival_time)
    for request in taken:
        kv.free(request)
        request.num_computed_tokens, request.num_output_placeholders = 0, 0
        request.num_preemptions += 1
        fallback.add_request(request)
    kv.flush()
    return fallback, {r.req_id: why for r in taken}


class SchedulerSwapping(SwapOwner):
    """``swap`` (RPC) and ``_check_swapped_policy`` after every ``schedule()``."""

    # Set by SchedulerService.__init__.
    slots: list[WorkerSlot]
    implementation: str  # the scheduling policy in charge, as health shows it
    previous_implementation: str  # shown again if a swapped-in policy is put aside
    scheduler_name: str  # whose scheduler: "modkit", "vllm" (modkit.vllm_v1), or a Scheduler subclass's name
    swap_key: str | None  # verifies classes sent by value (modkit.swap); None: none accepted
    limits: tuple[int, int, int]  # max_num_batched_tokens, max_num_seqs, max_model_len
    block_size: int
    enable_prefix_caching: bool
    kv_rpc: RpcClient
    events: EventPublisher

    def num_unfinished(self) -> int:
        """Requests in the schedulers or in a step: SchedulerService's, which a drain waits on."""
        raise NotImplementedError

    def swap(self, spec: ImplSpec) -> dict[str, str | bool]:
        """Order requests with another ``SchedulingPolicy`` from the next step on, or (after a drain)
        schedule with another whole scheduler: ``"modkit"``, ``"vllm"`` or a ``Scheduler`` subclass.

        It runs between steps (this process's one loop is not inside ``schedule()`` while it
        answers a call). The new policy is first tried on every queued and running request;
        if that raises, nothing changes and the caller gets the error. If it raises later, in
        a step, that step uses the old policy's answer and the old policy comes back.
        """
        if spec.name in SCHEDULERS:
            return self._swap_scheduler(spec.name)
        cls = resolve(spec, POLICIES.get, self.swap_key)  # a class sent by value only if its signature verifies
        if issubclass(cls, Scheduler):
            return self._swap_scheduler(spec.label(cls), cls)
        if not issubclass(cls, SchedulingPolicy):
            raise TypeError(f"{cls.__name__} is neither a SchedulingPolicy nor a Scheduler")
        if self.scheduler_name == "vllm":
            raise RuntimeError("scheduling policies are modkit's: swap the scheduler back to 'modkit' first")
        schedulers = [slot.scheduler for slot in self.slots]
        policy = cls()
        trial(policy, lambda p: try_scheduling_policy(p, schedulers))
        for scheduler in schedulers:  # one policy object: it orders every worker's requests alike
            scheduler.set_policy(GuardedPolicy(policy, in_charge(scheduler.policy)))
        previous, self.previous_implementation = self.implementation, self.implementation
        self.implementation = spec.label(cls)
        self._swapped_in("scheduler", self.implementation, previous)
        return {"implementation": self.implementation, "previous": previous}

    def _swap_scheduler(self, name: str, cls: type[Scheduler] | None = None) -> dict[str, str | bool]:
        """Schedule with modkit's ``Scheduler``, vLLM's own (``modkit.vllm_v1.VLLMScheduler``) or ``cls``,
        a ``Scheduler`` subclass named ``name``; needs a drain.

        Requests cannot be handed between two schedulers (their queues and block tables are
        the scheduler's state), so every worker must be idle. ``cls`` is first tried on a
        simulated workload (``try_scheduler``): if that raises, nothing changes. vLLM's
        scheduler brings its own KV cache manager, sized like the worker's pool; the KV cache
        manager process is not asked while it is in charge. Going back to modkit's (or to a
        subclass), each pool forgets its prefix cache, since vLLM's scheduler wrote other
        content into the worker's blocks.
        """
        if self.num_unfinished():
            raise RuntimeError(f"{self.num_unfinished()} requests are unfinished: drain before swapping the scheduler")
        if cls is not None:
            trial(cls, lambda c: try_scheduler(c, *self.limits, block_size=self.block_size))
        policy = self.implementation if self.implementation in ("fcfs", "priority") else "fcfs"
        for slot in self.slots:
            if name == "vllm":
                from modkit.vllm_v1.scheduler import VLLMScheduler

                num_blocks = int(self.kv_rpc.call("stats")["pools"][slot.worker_id]["kv_blocks_total"]) + 1
                slot.scheduler = VLLMScheduler(  # type: ignore[assignment]
                    num_blocks,
                    self.block_size,
                    *self.limits,
                    self.enable_prefix_caching,
                    policy,  # type: ignore[arg-type]
                )
            else:
                if self.scheduler_name == "vllm":
                    self.kv_rpc.call("reset_prefix_cache", slot.worker_id)
                if cls is None:
                    slot.scheduler = Scheduler(slot.kv, *self.limits, policy)
                else:
                    scheduler = guarded(cls)(slot.kv, *self.limits, policy)
                    scheduler.fall_back = self._scheduler_failed  # type: ignore[attr-defined]
                    slot.scheduler = scheduler
        previous, self.scheduler_name, self.implementation = self.scheduler_name, name, policy
        # Not _swapped_in: last_swap_error, about the policies, stays.
        self._publish_swapped(Swapped(time.time(), "scheduler", name, previous, None))
        return {"implementation": name, "previous": previous, "policy": policy, "drained": True}

    def _scheduler_failed(self, failed: Scheduler, error: str) -> SchedulerOutput:
        """A swapped-in scheduler failed in ``schedule()``: modkit's takes over on every worker.

        The step it failed in becomes an empty one that names its requests preempted, so the
        worker drops them; they are readmitted from the next step on, once any token still in
        flight for them is back (a step that preempted admits nobody). The other workers'
        requests are taken too, and their next plan tells their worker to drop them.
        """
        why = f"{self.scheduler_name} failed ({error}): modkit's scheduler takes over"
        output = None
        for slot in self.slots:
            fallback, taken = take_over(slot.scheduler, self.limits, why)
            slot.scheduler = fallback
            if slot.kv is failed.kv:
                # NOTE: the failed step's plan, built with the Scheduler's own output and record code.
                step = StepDraft(budget=fallback.max_num_batched_tokens, preempted=taken)
                output = fallback._make_output({}, [], step.preempted)
                fallback._record(step)
            else:
                fallback.finished_req_ids |= set(taken)
        assert output is not None, "the failed scheduler is not one of this process's"
        failed_name, self.scheduler_name = self.scheduler_name, "modkit"
        self._rolled_back("scheduler", "modkit", failed_name, error)
        return output

    def _check_swapped_policy(self, slot: WorkerSlot) -> None:
        """A swapped-in policy that failed in this step is replaced by the one before it, on every worker."""
        error = failure(slot.scheduler.policy)
        if error is None:
            return
        for other in self.slots:
            other.scheduler.set_policy(put_back(other.scheduler.policy))
        failed, self.implementation = self.implementation, self.previous_implementation
        self._rolled_back("scheduler", self.implementation, failed, error)

    def _publish_swapped(self, event: Swapped) -> None:
        self.events.publish("swap.scheduler", event)
