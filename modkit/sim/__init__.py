"""What-if on a recorded run: the real scheduler, KV cache manager and router, with a cost model for the forward.

::

    from modkit.sim import CostModel, Workload, simulate, workload_from_trace

    trace = pipeline.trace()                         # a live run
    cost = CostModel.fit(trace)                      # a step's time, fitted on its steps
    what_if = simulate(workload_from_trace(trace), cost, num_kv_blocks=64)
    what_if.summary()                                # throughput, TTFT, ITL, preemptions, hits

``workload`` (what to replay), ``cost_model`` (how long a step takes; ``regression``, the
robust fit behind it; ``cpu_share``, how a step on the CPU changes with its share of the
cores; ``coverage``, which steps a fit's recording held and how far a what-if goes beyond
them; ``worker_loop``, a GPU worker's loop, timed), ``simulate`` (the simulated clock that
drives the real objects; ``launch``, the KV pool a launch would give each worker) and
``sweep`` (a capacity sweep: many rates and configurations, and where each stops keeping up).
A simulation answers in seconds what a live run answers in minutes, as well as its cost model
predicts step times.
"""

from modkit.sim.cost_model import GPUS, CostModel, FitError
from modkit.sim.coverage import Coverage, Extrapolation
from modkit.sim.cpu_share import CpuShare
from modkit.sim.simulate import simulate
from modkit.sim.sweep import capacity_sweep, knees
from modkit.sim.worker_loop import WorkerLoop
from modkit.sim.workload import Workload, WorkloadRequest, workload_from_trace

__all__ = [
    "GPUS",
    "CostModel",
    "Coverage",
    "CpuShare",
    "Extrapolation",
    "FitError",
    "WorkerLoop",
    "Workload",
    "WorkloadRequest",
    "capacity_sweep",
    "knees",
    "simulate",
    "workload_from_trace",
]
