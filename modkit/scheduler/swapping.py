"""The scheduler process's side of a swap: the scheduling policy, and the whole scheduler after a drain.

``SchedulerService`` takes this mixin, so its own file keeps the step loop and its messages.
The mechanism is ``modkit.guard``: a new policy is tried on every queued and running
request (``try_scheduling_policy``), then runs on every worker's scheduler inside a
``GuardedPolicy``; if it fails in a step, that step gets the old policy's answer and the old
policy comes back on every worker once the step is planned (``_check_swapped_policy``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from modkit.guard import SwapOwner, failure, in_charge, put_back, trial
from modkit.scheduler.policies import POLICIES, GuardedPolicy, SchedulingPolicy
from modkit.scheduler.scheduler import Scheduler
from modkit.swap import ImplSpec, resolve
from modkit.trace.events import Swapped

if TYPE_CHECKING:
    from modkit.scheduler.slots import WorkerSlot
    from modkit.trace.events import EventPublisher
    from modkit.transport import RpcClient

SCHEDULERS = ("modkit", "vllm")  # whole schedulers, swapped only after a drain (see _swap_scheduler)


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


class SchedulerSwapping(SwapOwner):
    """``swap`` (RPC) and ``_check_swapped_policy`` after every ``schedule()``."""

    # Set by SchedulerService.__init__.
    slots: list[WorkerSlot]
    implementation: str  # the scheduling policy in charge, as health shows it
    previous_implementation: str  # shown again if a swapped-in policy is put aside
    scheduler_name: str  # whose scheduler: "modkit", or "vllm" (modkit.vllm_v1)
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
        """Order requests with another ``SchedulingPolicy`` from the next step on.

        It runs between steps (this process's one loop is not inside ``schedule()`` while it
        answers a call). The new policy is first tried on every queued and running request;
        if that raises, nothing changes and the caller gets the error. If it raises later, in
        a step, that step uses the old policy's answer and the old policy comes back.
        """
        if spec.name in SCHEDULERS:
            return self._swap_scheduler(spec.name)
        if self.scheduler_name != "modkit":
            raise RuntimeError("scheduling policies are modkit's: swap the scheduler back to 'modkit' first")
        cls = resolve(spec, POLICIES.get, self.swap_key)
        if not issubclass(cls, SchedulingPolicy):
            raise TypeError(f"{cls.__name__} is not a SchedulingPolicy")
        schedulers = [slot.scheduler for slot in self.slots]
        policy = cls()
        trial(policy, lambda p: try_scheduling_policy(p, schedulers))
        for scheduler in schedulers:  # one policy object: it orders every worker's requests alike
            scheduler.set_policy(GuardedPolicy(policy, in_charge(scheduler.policy)))
        previous, self.previous_implementation = self.implementation, self.implementation
        self.implementation = spec.label(cls)
        self._swapped_in("scheduler", self.implementation, previous)
        return {"implementation": self.implementation, "previous": previous}

    def _swap_scheduler(self, name: str) -> dict[str, str | bool]:
        """Schedule with modkit's ``Scheduler`` or vLLM's own (``modkit.vllm_v1.VLLMScheduler``); needs a drain.

        Requests cannot be handed between the two (their block tables live in different KV
        cache managers), so every worker must be idle. vLLM's scheduler brings its own KV
        cache manager, sized like the worker's pool; the KV cache manager process is not
        asked while it is in charge. Going back to modkit's, each pool forgets its prefix
        cache, since vLLM's scheduler wrote other content into the worker's blocks.
        """
        if self.num_unfinished():
            raise RuntimeError(f"{self.num_unfinished()} requests are unfinished: drain before swapping the scheduler")
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
                slot.scheduler = Scheduler(slot.kv, *self.limits, policy)
        previous, self.scheduler_name, self.implementation = self.scheduler_name, name, policy
        # Not _swapped_in: a whole scheduler is not on trial (no guard), and last_swap_error,
        # about the policies, stays.
        self._publish_swapped(Swapped(time.time(), "scheduler", name, previous, None))
        return {"implementation": name, "previous": previous, "policy": policy, "drained": True}

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
