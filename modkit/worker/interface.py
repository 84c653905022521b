"""The contract between the engine (or the worker process) and a worker.

A worker holds the model, the paged KV cache tensors and, for each request the scheduler
sent it, the request's tokens and block table. Each step it runs one scheduler plan::

    SchedulerOutput --> execute_model --> StepResult
    {req_id: n}                           logits (len(req_ids), V) float32, row i is req_ids[i]

A worker may assume:

- plans arrive in the order the scheduler made them, each once;
- a plan's block ids were handed out by the KV cache manager for exactly that request, and
  its ``num_computed_tokens`` agree with what the worker computed before (the scheduler
  keeps the worker's view: ``SchedulerOutput`` is a diff against it).

It must:

1. execute exactly the plan, holding no policy of its own: for each request in
   ``num_scheduled_tokens``, compute its next ``n`` tokens (from its ``num_computed_tokens``
   on), writing their keys and values only into the slots of that request's blocks;
2. keep each request's block table between steps as ``scheduled_new_reqs`` (the whole
   table) and ``scheduled_cached_reqs`` (blocks appended) build it, and drop the requests
   in ``finished_req_ids`` and ``preempted_req_ids`` before running the step;
3. return one logits row for each request whose every known token is now computed (it
   samples a next token), in ``StepResult.req_ids`` order; a prompt chunk that stops
   mid-prompt gets no row;
4. under async scheduling, fill in the token a plan asks for beyond what it was sent: the
   one this worker sampled in the step before (``record_sampled_on_device`` when that step
   is launched, ``record_sampled`` once its tokens are on the host).

``modkit.worker.Worker`` is the implementation: the same object runs in ``EngineCore``
(one process) and behind ``WorkerService`` (its own process).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from modkit.scheduler.output import SchedulerOutput
from modkit.worker.worker import StepResult


@runtime_checkable
class WorkerInterface(Protocol):
    """Runs scheduler plans on the model; see the module docstring for the contract."""

    def execute_model(self, scheduler_output: SchedulerOutput) -> StepResult:
        """Run one plan: the forward over exactly its tokens and blocks; logits for the requests that sample."""
        ...

    def record_sampled_on_device(self, step: int, req_ids: list[str], device_ids: torch.Tensor) -> None:
        """Step ``step`` was launched and samples ``req_ids`` into ``device_ids`` (N,) int64, still on the device."""
        ...

    def record_sampled(self, step: int, req_ids: list[str], token_ids: list[int]) -> None:
        """Step ``step``'s sampled tokens reached the host."""
        ...

    def forget(self, scheduler_output: SchedulerOutput) -> None:
        """The step failed: drop its requests; a plan made after it skips them until the scheduler drops them too."""
        ...
