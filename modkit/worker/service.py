"""A worker process: the model, its paged KV cache, and the sampler implementation next to the logits.

::

    scheduler --StepPlan--> worker-i.in
        launch: Worker.execute_model(plan)      exactly the plan: its req ids, token counts, block ids
                sampler.sample(logits, states)  the implementation the Sampler process names
        finish: the sampled ids to the host (the one copy)
    scheduler.in <--StepDone(sampled ids, timings)--     sampler.in <--SamplerReport--
    (or StepFailed, if the step raised: the scheduler fails its requests, the worker goes on)

The scheduler keeps two steps in flight (async scheduling). On a GPU the worker launches a
plan as soon as it arrives, and finishes the step before it only then: the device runs
one step after the other with no gap, and step N+1 reads step N's tokens on the device
(``Worker``). A step the device has already finished when a plan arrives is finished
first, so its result goes out without waiting for the launch. With nothing new to launch,
a step is finished once the device is done with it. A plan whose sampling reads the last
step's tokens (penalties, ``min_tokens``) waits for them instead.

Logits never leave this process: the Sampler process owns the sampling configuration
(which implementation, the seed) and its statistics, and the worker asks it for that
configuration when it starts, then runs the implementation where the logits already are
(for a GPU, the logits stay on the card and one small copy of sampled ids comes back).

A ``Beacon`` thread tells the router every 0.5 s that this process lives, also while the
main thread is deep in a long forward.

A plan from a scheduler process this worker has not seen (``StepPlan.scheduler_id``: the
scheduler restarted) first makes it finish the steps it has and drop every request: the
new scheduler sends again, as new, the ones it goes on with.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any

import msgspec
import torch

from modkit.attention.interface import resolve_attention_backend
from modkit.config import PipelineConfig, cpu_step_threads
from modkit.engine.config import EngineConfig
from modkit.kvtransfer.worker_side import make_connector
from modkit.model import resolve_model_path
from modkit.model.config import ModelConfig
from modkit.pipeline.addresses import PipelineAddresses, worker_name
from modkit.protocol import SamplerReport, StepDone, StepFailed, StepPlan, WorkerHeartbeat
from modkit.sampler import Sampler
from modkit.sampler.interface import SAMPLERS
from modkit.sampling_params import SamplingParams
from modkit.scheduler.output import NewRequestData, SchedulerOutput
from modkit.swap import ImplSpec, resolve
from modkit.trace.events import EventPublisher, ForwardEvent
from modkit.transport import Inbox, Outbox, RpcClient
from modkit.transport.channels import Beacon
from modkit.worker.executor import LaunchedStep, StepExecutor, grammar_backend, start_worker
from modkit.worker.swapping import WorkerSwapping
from modkit.worker.tensor_parallel import RankDied, check_tensor_parallel

HEARTBEAT_INTERVAL_S = 0.5


log = logging.getLogger(__name__)


class WorkerService(WorkerSwapping):
    def __init__(
        self, config: dict[str, Any], ipc_dir: str, worker_id: int, max_model_len: int, swap_key: str | None = None
    ) -> None:
        cfg = PipelineConfig.from_dict(config)
        self.swap_key = swap_key  # verifies classes sent by value (modkit.swap); None: none accepted
        engine = cfg.to_engine_config(worker_id)
        self.worker_id, self.started = worker_id, time.time()
        self.max_model_len = max_model_len
        addresses = PipelineAddresses(ipc_dir, cfg.addresses or {})
        model_config = ModelConfig.from_pretrained(resolve_model_path(engine.model))
        check_tensor_parallel(engine.tensor_parallel_size, model_config, engine.device)
        # Workers on one device share its memory: each sizes its cache for its share of the budget.
        # With tensor_parallel_size N > 1 this process is rank 0 of N (modkit.worker.tensor_parallel).
        sharing = cfg.workers_sharing_device(worker_id)
        self.model, self.worker, self.memory = start_worker(engine, max_model_len, num_sharing=sharing)
        self.ranks = self.worker.runner.tensor_parallel_ranks
        try:
            self._connect(cfg, engine, addresses, worker_id, swap_key)
        except BaseException:
            self.close_ranks()
            raise

    def _connect(
        self,
        cfg: PipelineConfig,
        engine: EngineConfig,
        addresses: PipelineAddresses,
        worker_id: int,
        swap_key: str | None,
    ) -> None:
        """The sampler's choice, then the sockets: everything after the model and its worker."""
        self.device = self.model.lm_head.weight.device
        self.num_blocks = self.memory.num_blocks
        self.block_size = engine.block_size
        self.attention_backend = resolve_attention_backend(engine.attention_backend, self.device)
        # A CPU worker computes a step of fewer than parallel_min_tokens tokens on one of its threads
        # (PipelineConfig.cpu_parallel_min_tokens); tensor-parallel ranks keep theirs, all alike.
        self.threads = torch.get_num_threads()
        self.parallel_min_tokens = cfg.worker_parallel_min_tokens(self.threads) if self.device.type == "cpu" else 1
        self.step_threads = self.threads  # what torch runs on now
        log.info("%s: %s", worker_name(worker_id), self.memory.describe(self.max_model_len))
        with RpcClient(addresses.rpc("sampler"), timeout_s=30.0) as sampler_rpc:
            choice = sampler_rpc.call("config")  # the Sampler process decides which implementation runs here
        self.sampler_name = choice["implementation"]
        spec = msgspec.convert(choice["spec"], ImplSpec)
        sampler: Sampler = resolve(spec, SAMPLERS.get, swap_key)(seed=choice["seed"])
        self.executor = StepExecutor(
            self.worker, sampler, self.model.config.eos_token_ids, grammar_backend(engine.model, self.model.config)
        )
        self.attention_backend_spec = ImplSpec(name=engine.attention_backend)
        self.previous_sampler_name = self.sampler_name  # names shown again if a swapped-in one is put aside
        self.previous_attention_backend = engine.attention_backend
        self.last_swap_error: str | None = None
        self.inbox = Inbox(addresses.inbox(worker_name(worker_id)), allow_remote=cfg.allow_remote)
        self.to_scheduler = Outbox(addresses.inbox("scheduler"))
        self.to_sampler = Outbox(addresses.inbox("sampler"))
        self.events = EventPublisher(worker_name(worker_id), addresses.events(worker_name(worker_id)), cfg.allow_remote)
        pid = os.getpid()
        self.beacon = Beacon(
            addresses.inbox("router"),
            lambda: WorkerHeartbeat(worker_id, pid, time.monotonic()),
            HEARTBEAT_INTERVAL_S,
        )
        self.launched: deque[LaunchedStep] = deque()  # at most one between calls of run_once
        self.scheduler_id = ""  # of the scheduler process whose plans this worker runs (StepPlan.scheduler_id)
        self.num_steps = 0
        self.num_failed_steps = 0
        self.last_error: str | None = None  # of the last step, if it failed
        self.num_tokens = 0
        self.forward_s = 0.0
        self.sample_s = 0.0
        layers = self.worker.runner.kv_cache.layers
        self.connector = make_connector(cfg, worker_id, layers, lambda i: addresses.rpc(worker_name(i)))

    def wait_sockets(self) -> list[Inbox]:
        return [self.inbox]

    @property
    def sampler(self) -> Sampler:
        """The implementation that samples next to the logits (the Sampler process names it)."""
        return self.executor.sampler

    @sampler.setter
    def sampler(self, sampler: Sampler) -> None:
        self.executor.sampler = sampler

    def run_once(self) -> bool:
        for message in self.inbox.drain():
            if isinstance(message, StepPlan):
                if message.scheduler_id != self.scheduler_id:
                    self._new_scheduler(message.scheduler_id)
                self._launch(message.output)
        if self.launched and self.launched[0].is_done():
            self._finish(self.launched.popleft())
        return bool(self.launched)  # busy: look again without waiting, for a plan or the device

    def _new_scheduler(self, scheduler_id: str) -> None:
        """Plans come from another scheduler process (it restarted): finish the old one's steps, drop every request."""
        while self.launched:
            self._finish(self.launched.popleft())
        self.worker.drop_all()
        self.executor.states.clear()
        self.scheduler_id = scheduler_id

    def _launch(self, plan: SchedulerOutput) -> None:
        """Queue the plan's forward and sampling; then finish the step before it, now behind it on the device.

        A step the device has already finished is finished first: its result reaches the
        scheduler a launch earlier, and the scheduler plans the next step while this one launches.
        """
        while self.launched and self.launched[0].is_done():
            self._finish(self.launched.popleft())
        if self.launched and not self.executor.can_launch_ahead(plan):
            self._finish(self.launched.popleft())  # its tokens first: this plan's sampling reads them
        try:
            if self.connector is not None:
                self._load_kv(plan)
            self._use_threads(plan.total_num_scheduled_tokens)
            launched = self.executor.launch(plan)
            if self.connector is not None:
                self.connector.wait_for_save(plan.kv_connector_metadata)
        except RankDied:  # this worker cannot compute any more: its process exits, the supervisor restarts it
            raise
        except Exception as error:  # a failed step fails its requests, not the worker
            while self.launched:  # the scheduler hears of steps in the order it planned them
                self._finish(self.launched.popleft())
            self._fail(plan, time.time(), error)
            return
        self.launched.append(launched)
        while len(self.launched) > 1:
            self._finish(self.launched.popleft())

    def _use_threads(self, num_tokens: int) -> None:
        """Run the next step on the threads its size calls for (one, or all of the worker's)."""
        threads = cpu_step_threads(num_tokens, self.threads, self.parallel_min_tokens)
        if threads != self.step_threads:
            torch.set_num_threads(threads)
            self.step_threads = threads

    # -- disaggregated prefill and decode (modkit.kvtransfer) ----------------------------------

    def _load_kv(self, plan: SchedulerOutput) -> None:
        """Decode side: fill the blocks of requests a prefill worker computed, before the forward."""
        assert self.connector is not None
        meta = plan.kv_connector_metadata
        if not meta or not meta.reqs_to_load:
            return
        new = {r.req_id: r for r in plan.scheduled_new_reqs}
        tables = {req_id: new[req_id].block_ids for req_id in meta.reqs_to_load}

        def recompute(req_id: str, first_token: int, num_tokens: int) -> None:
            self._recompute(plan.step, new[req_id], first_token, num_tokens)

        self.connector.start_load_kv(meta, tables, recompute)
        for event in self.connector.get_finished():
            self.events.publish(f"transfer.{self.worker_id}", event)

    def _recompute(self, step: int, request: NewRequestData, first_token: int, num_tokens: int) -> None:
        """A load failed: compute the request's tokens ``first_token`` ... into its blocks here instead,
        as a request of its own (one forward, its sampled token unused), before ``step``'s forward."""
        num_tokens = min(num_tokens, request.num_computed_tokens - first_token)  # not past what the plan counts
        recompute_id = f"{request.req_id}#recompute"
        params = SamplingParams(max_tokens=1)
        job = NewRequestData(
            recompute_id, request.token_ids, request.num_prompt_tokens, request.block_ids, first_token, params
        )
        scheduled = {recompute_id: num_tokens}
        self.worker.execute_model(SchedulerOutput(step, [job], [], scheduled, num_tokens, set(), set()))
        self.worker.execute_model(SchedulerOutput(step, [], [], {}, 0, {recompute_id}, set()))  # forget it

    def kv_blocks(self, req_id: str, first_block: int, num_blocks: int) -> dict[str, Any]:
        """Prefill side, over RPC: a kept request's blocks, for the decode worker that reads them."""
        if self.connector is None:
            return {"found": False}
        return self.connector.kv_blocks(req_id, first_block, num_blocks)

    def kv_release(self, req_id: str) -> None:
        """Prefill side, over RPC: the decode worker has copied the blocks it was lent (``shm``, ``cuda_ipc``)."""
        if self.connector is not None:
            self.connector.kv_release(req_id)

    def _finish(self, step: LaunchedStep) -> None:
        """The step's tokens to the host (waiting for the device), and its result to the scheduler."""
        plan = step.plan
        t0 = time.perf_counter()
        try:
            output = self.executor.finish(step)  # the one host copy
        except Exception as error:
            self._fail(plan, step.started, error)
            return
        sample_s = step.sample_s + time.perf_counter() - t0
        if step.result.num_tokens:  # a step that only skipped requests of a failed one proves nothing
            self.last_error = None
        self._check_swaps()
        done = StepDone(self.worker_id, plan.step, output, step.forward_s, sample_s, self.scheduler_id)
        self.to_scheduler.send(done)
        states = self.executor.states
        constrained = sum(1 for r in output.req_ids if r in states and states[r].grammar is not None)
        self._publish(plan, step.started, step.forward_s, sample_s, len(output.req_ids), constrained, step.num_threads)
        if output.req_ids:
            greedy = sum(1 for r in output.req_ids if r in states and states[r].params.temperature == 0.0)
            self.to_sampler.send(SamplerReport(self.worker_id, len(output.req_ids), greedy, sample_s, constrained))
        self.num_steps += 1
        self.num_tokens += step.result.num_tokens
        self.forward_s += step.forward_s
        self.sample_s += sample_s

    def _fail(self, plan: SchedulerOutput, started: float, error: Exception) -> None:
        log.error("step %d failed", plan.step, exc_info=error)
        self.executor.fail(plan)
        self.num_failed_steps += 1
        self.last_error = f"{type(error).__name__}: {error}"
        self.to_scheduler.send(StepFailed(self.worker_id, plan.step, self.last_error, self.scheduler_id))
        self._publish(plan, started, 0.0, 0.0, 0, failed=self.last_error)

    def _publish(
        self,
        plan: SchedulerOutput,
        started: float,
        forward_s: float,
        sample_s: float,
        num_sampled: int,
        num_constrained: int = 0,
        num_threads: int = 0,
        failed: str | None = None,
    ) -> None:
        if not self.events.wants(f"forward.{self.worker_id}"):
            return  # nobody listens: not even built
        event = ForwardEvent(
            worker_id=self.worker_id,
            step=plan.step,
            started=started,
            forward_s=forward_s,
            sample_s=sample_s,
            num_tokens=plan.total_num_scheduled_tokens,
            num_seqs=len(plan.num_scheduled_tokens),
            num_sampled=num_sampled,
            failed=failed,
            num_constrained=num_constrained,
            num_threads=num_threads,
        )
        self.events.publish(f"forward.{self.worker_id}", event)

    def announce_events(self, token: str) -> None:
        """Publish ``Hello(token)``: tells a new subscriber that its subscription arrived."""
        self.events.announce(token)

    def info(self) -> dict[str, Any]:
        """What the launcher sizes the KV cache manager's pool for this worker from."""
        return {
            "worker_id": self.worker_id,
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            "kv_capacity_tokens": self.memory.kv_capacity_tokens,
            "memory": self.memory.describe(self.max_model_len),
            "cuda_graphs": self.worker.runner.graphs is not None,
            "device": str(self.device),
            "dtype": str(self.model.lm_head.weight.dtype).removeprefix("torch."),
            "threads": self.threads,  # the worker's OpenMP threads; steps under parallel_min_tokens use one
            "parallel_min_tokens": self.parallel_min_tokens,
            "tensor_parallel_size": self.model.tp.size,
            "tensor_parallel_pids": self.ranks.pids if self.ranks is not None else [],  # ranks 1..N-1
        }

    def health(self) -> dict[str, Any]:
        """503 while its last step failed (a worker that cannot compute cannot do its job)."""
        return {
            "status": "ok" if self.last_error is None else "error",
            **({} if self.last_error is None else {"error": self.last_error}),
            "component": worker_name(self.worker_id),
            "implementation": f"ModelRunner({self.model.config.architecture}, {self.attention_backend})",
            "sampler": self.sampler_name,
            "attention_backend": self.attention_backend,
            "last_swap_error": self.last_swap_error,
            "uptime_s": round(time.time() - self.started, 3),
            **self.info(),
        }

    def stats(self) -> dict[str, Any]:
        return {
            "num_steps": self.num_steps,
            "num_failed_steps": self.num_failed_steps,
            "num_tokens_computed": self.num_tokens,
            "num_requests_held": len(self.worker.requests),
            "forward_s_total": self.forward_s,
            "sample_s_total": self.sample_s,
            **({} if self.connector is None else {"kv_transfer": self.connector.stats()}),
        }

    def close_ranks(self) -> None:
        """Stop the tensor-parallel ranks 1..N-1, if any."""
        if self.ranks is not None:
            self.ranks.close()

    def close(self) -> None:
        if self.connector is not None:
            self.connector.close()
        self.close_ranks()
        self.beacon.close()
        self.events.close()
        for closable in (self.inbox, self.to_scheduler, self.to_sampler):
            closable.close()
