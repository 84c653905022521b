"""The scheduler process's side of each worker: its ``Scheduler``, its KV pool's client, its steps in flight."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from modkit.kvcache.client import KVCacheManagerClient
from modkit.scheduler.output import SchedulerOutput, StepRecord
from modkit.scheduler.scheduler import Scheduler
from modkit.transport import Outbox


@dataclass(slots=True)
class InFlightStep:
    """A step sent to a worker whose result has not come back."""

    plan: SchedulerOutput
    record: StepRecord | None  # what the scheduler decided, for the step's event
    sent_at: float  # perf_counter() when it left
    sent_wall: float  # time.time() then, for the event stream
    schedule_s: float  # what planning it took
    kv_s: float  # of that, waiting for the KV cache manager's replies


@dataclass(slots=True)
class WorkerSlot:
    """The scheduler's side of one worker."""

    worker_id: int
    scheduler: Scheduler
    kv: KVCacheManagerClient
    outbox: Outbox
    alive: bool = True
    requeued: bool = False  # its KV pool was lost and its requests requeued; not yet rejoined
    to_drop: set[str] = field(default_factory=set)  # requeued requests the worker must drop (next plan)
    num_kv_rebuilds: int = 0  # times its KV pool was lost and its requests requeued
    in_flight: deque[InFlightStep] = field(default_factory=deque)  # oldest first, as the worker runs them
    num_steps: int = 0
    num_failed_steps: int = 0
    busy_s: float = 0.0  # plan sent -> result back, summed (with async scheduling, time queued at the worker too)
    num_planned_ahead: int = 0  # steps planned while another was in flight
    forward_s: float = 0.0  # the worker's own account of its forward
    sample_s: float = 0.0
    schedule_s: float = 0.0  # this process: schedule(), with its KV cache manager round trips
    update_s: float = 0.0  # this process: update_from_output(), with its flush

    def stats(self) -> dict[str, float | int | bool]:
        """This worker's part of the scheduler's ``/stats``."""
        s, kv = self.scheduler, self.kv
        return {
            "worker_id": self.worker_id,
            "alive": self.alive,
            "num_requests_running": len(s.running),
            "num_requests_waiting": len(s.waiting),
            "num_preemptions": s.num_preemptions,
            "num_kv_rebuilds": self.num_kv_rebuilds,
            "num_steps": self.num_steps,
            "num_failed_steps": self.num_failed_steps,
            "kv_cache_usage": s.kv.usage,
            "kv_round_trips": kv.num_round_trips,
            "kv_round_trip_s_total": kv.round_trip_s,  # waited for the KV cache manager
            "kv_manager_s_total": kv.manager_s,  # of that, the manager working
            "step_time_s_mean": self.busy_s / self.num_steps if self.num_steps else 0.0,
            "num_planned_ahead": self.num_planned_ahead,
            "num_steps_in_flight": len(self.in_flight),
            "forward_s_total": self.forward_s,
            "sample_s_total": self.sample_s,
            "schedule_s_total": self.schedule_s,
            "update_s_total": self.update_s,
        }
