"""``Pipeline``: launch the six components as background processes, watch them, stop them.

::

    p = Pipeline.launch(num_workers=2)      # returns once every /health answers 200
    p.client().chat.completions.create(...)  # an openai.OpenAI bound to the frontend
    p.health(); p.stats(); p.logs("scheduler"); p.restart("router")
    p.trace().steps                         # what the scheduler decided each step (modkit.trace)
    p.shutdown()                            # or: with Pipeline.launch() as p: ...

Start order, and why: every component but one starts at once (they connect lazily; a
worker's first call asks the sampler which sampling implementation to run, and waits for
it). Each worker loads the model and sizes its KV cache from free memory; then the KV
cache manager starts with one block pool per worker, sized from what each allocated.
``max_model_len`` is never more than a worker's pool holds: with ``num_kv_blocks`` given it is
fitted before anything starts (``resolve_max_model_len``); a pool sized from free memory is
known only once the workers report it, and if the length must be lowered then, the scheduler
and frontend, which took it at start, start again with the lowered value.

Components run in their own sessions, so a Ctrl-C or a notebook cell interrupt reaches
only the launcher; if the launcher dies, each child sees its stdin close and exits by
itself, and the next launch removes the socket directory it left (``sweep_stale_dirs``).
``shutdown`` also runs at interpreter exit (a ``weakref.finalize``).

Once it serves, a supervisor thread restarts any component that dies, with backoff and a
limit (``modkit.pipeline.supervisor``; ``supervise=False`` turns it off). ``restart``,
``swap``, ``shutdown`` and the supervisor take one lock, so none of them runs into another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from modkit.config import PipelineConfig
from modkit.frontend import EMBEDDED_MODEL_NAME
from modkit.pipeline.addresses import PipelineAddresses, worker_name
from modkit.pipeline.preflight import check_ports_free, fit_to_kv_pool, resolve_max_model_len, with_ports
from modkit.pipeline.processes import (
    READY_TIMEOUT_S,
    TARGETS,
    ComponentSpec,
    cpu_seconds,
    log_dir_of,
    on_cuda,
    progress_printer,
    stop_all,
    usable_cores,
    wait_uninterrupted,
    worker_threads_env,
)
from modkit.pipeline.supervisor import Supervisor
from modkit.pipeline.swapping import SWAPPABLE, swap_component
from modkit.swap import new_key
from modkit.trace import EventStream, Recorder, Trace

if TYPE_CHECKING:  # openai loads only when a client is asked for
    import openai
from modkit.transport import QUIET_THREADS, ComponentProcess
from modkit.transport.addresses import run_dir
from modkit.transport.process import default_log_dir
from modkit.transport.rundirs import sweep_stale_dirs
from modkit.transport.security import new_launch_keys

P = ParamSpec("P")
R = TypeVar("R")


def _exclusive(method: Callable[Concatenate[Pipeline, P], R]) -> Callable[Concatenate[Pipeline, P], R]:
    """Run ``method`` holding the pipeline's lock: one restart, swap or shutdown at a time, and
    none while the supervisor restarts something."""

    @functools.wraps(method)
    def holding_lock(self: Pipeline, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._lock:
            return method(self, *args, **kwargs)

    return holding_lock


def _stop_everything(
    supervisor: Supervisor, cancel: threading.Event, processes: dict[str, ComponentProcess], ipc_dir: str
) -> None:
    """The supervisor first (it would restart what stops), then every process."""
    cancel.set()  # a restart the supervisor has under way gives up within 0.1 s
    supervisor.stop()
    stop_all(processes, ipc_dir)


class Pipeline:
    """The running pipeline; build it with ``Pipeline.launch``."""

    def __init__(self, config: PipelineConfig, addresses: PipelineAddresses) -> None:
        self.config, self.addresses = config, addresses
        self.processes: dict[str, ComponentProcess] = {}
        self.specs: dict[str, ComponentSpec] = {}
        self.max_model_len = 0
        self.model_name = config.resolved_model() or EMBEDDED_MODEL_NAME
        self.num_blocks: list[int] = []  # each worker's KV pool
        self.recorder: Recorder | None = None
        self._cpu_at_clear: dict[tuple[str, int], float] = {}  # each process's CPU seconds at the trace's start
        self.swap_key = new_key()  # signs classes sent by value to its components (modkit.swap)
        self.keys = new_launch_keys()  # sign control calls; CURVE on tcp:// (modkit.transport.security)
        self._closed = False
        self._cancel = threading.Event()
        self._lock = threading.RLock()  # see _exclusive
        self.supervisor = Supervisor(config)
        self._finalizer = weakref.finalize(
            self, _stop_everything, self.supervisor, self._cancel, self.processes, addresses.ipc_dir
        )

    @classmethod
    def launch(
        cls,
        config: PipelineConfig | None = None,
        *,
        ports: int | str | None = None,
        progress: bool = True,
        ipc_dir: str | None = None,
        record: bool = True,
        **kwargs: Any,
    ) -> Pipeline:
        """Start every component and return once each answers ``/health`` with 200.

        ``config`` or keyword arguments (``PipelineConfig``'s fields), not both. ``ports``:
        None keeps the config's ports (8001-8006 by default), ``"auto"`` takes a run of free
        ones, a number N lays them out from N in the same order (``with_ports``); the
        notebooks pass ``MODKIT_PORTS`` here. A bad value raises ``ConfigError``, and a port
        already taken ``PortInUseError``, before any process starts. Interrupted (Ctrl-C, a
        cell interrupt) or failed, it stops whatever it had started before raising. With
        ``record`` (the default), a thread of this process keeps the event stream from the
        start, for ``trace()``. First it removes what dead launches left in the temporary
        directory (``modkit.transport.rundirs``); once every component serves, the supervisor
        starts (unless ``supervise=False``), and says what it restarts through the same
        progress lines.
        """
        if config is not None and kwargs:
            raise TypeError("pass a PipelineConfig or keyword arguments, not both")
        config = with_ports(config if config is not None else PipelineConfig(**kwargs), ports)
        max_model_len = resolve_max_model_len(config)
        check_ports_free(config)
        sweep_stale_dirs()
        addresses = (
            PipelineAddresses.at(ipc_dir, config.addresses) if ipc_dir else PipelineAddresses.fresh(config.addresses)
        )
        pipeline = cls(config, addresses)
        pipeline.max_model_len = max_model_len
        say = progress_printer(progress)
        try:
            pipeline._start_all(say)
            if record:
                pipeline.recorder = Recorder(pipeline.events(), pipeline._trace_meta())
                pipeline._cpu_at_clear = pipeline._cpu_seconds()
            if config.supervise:
                pipeline.supervisor.say = say if progress else None
                pipeline.supervisor.start(pipeline)
        except BaseException:
            pipeline.shutdown()
            raise
        say(f"pipeline ready: {pipeline.url}/v1 serving {pipeline.model_name!r}\n")
        return pipeline

    def _start_all(self, say: Callable[[str], None]) -> None:
        cfg = self.config
        common = {"config": cfg.to_dict(include_secrets=True), "ipc_dir": self.addresses.ipc_dir}
        with_len = {**common, "max_model_len": self.max_model_len}
        signed = {"swap_key": self.swap_key}  # for the components that take classes by value (Pipeline.swap)
        quiet, ports = dict(QUIET_THREADS), cfg.ports()
        worker_env = worker_threads_env(cfg)
        workers = [
            ComponentSpec(
                worker_name(i),
                TARGETS["worker"],
                {**with_len, **signed, "worker_id": i},
                ports[worker_name(i)],
                worker_env,
            )
            for i in range(cfg.num_workers)
        ]
        # Everything but the KV cache manager starts at once: components connect lazily, and
        # ZeroMQ queues what is sent before the peer binds (a worker's first call to the
        # sampler waits for it). The KV cache manager needs each worker's number of blocks.
        self._start_together(
            [
                ComponentSpec("sampler", TARGETS["sampler"], {**common, **signed}, ports["sampler"], quiet),
                *workers,
                ComponentSpec("scheduler", TARGETS["scheduler"], {**with_len, **signed}, ports["scheduler"], quiet),
                ComponentSpec("router", TARGETS["router"], {**common, **signed}, ports["router"], quiet),
                ComponentSpec("frontend", TARGETS["frontend"], dict(with_len), None, quiet),
            ],
            say,
        )
        num_blocks = self.num_blocks
        for spec in workers:
            with self.processes[spec.name].client(timeout_s=30.0) as rpc:
                num_blocks.append(int(rpc.call("info")["num_blocks"]))
            # A restarted worker must match its pool in the KV cache manager, block for block.
            spec.kwargs["config"] = {**spec.kwargs["config"], "num_kv_blocks": num_blocks[-1]}
        if cfg.num_kv_blocks is None:  # sized from free memory: known only now
            self._fit_to_kv_pools(min(num_blocks), say)
        kv_kwargs = {
            "num_blocks": num_blocks,
            "block_size": cfg.block_size,
            "enable_prefix_caching": cfg.enable_prefix_caching,
            "eviction_policy": cfg.eviction_policy,
            "events_address": self.addresses.kv_events,
            "allow_remote": cfg.allow_remote,
            **signed,
        }
        self._start(
            ComponentSpec("kv_cache_manager", TARGETS["kv_cache_manager"], kv_kwargs, ports["kv_cache_manager"], quiet),
            say,
        )
        self.wait_healthy()

    @_exclusive  # it restarts components: not while the supervisor restarts one
    def _fit_to_kv_pools(self, num_blocks: int, say: Callable[[str], None]) -> None:
        """``max_model_len`` within the smallest pool the workers sized from free memory
        (``fit_to_kv_pool``: ConfigError if the user set a length it cannot hold). If it is
        lowered, the components that took the old value at start (scheduler, frontend) start
        again with the new one; no request has reached them yet. A given ``num_kv_blocks`` is
        fitted before anything starts (``resolve_max_model_len``)."""
        fitted = fit_to_kv_pool(self.config, self.max_model_len, num_blocks)
        if fitted == self.max_model_len:
            return
        self.max_model_len = fitted
        for spec in self.specs.values():
            if "max_model_len" in spec.kwargs:
                spec.kwargs["max_model_len"] = fitted
        for name in ("scheduler", "frontend"):
            self.processes[name].stop()
            self._start(self.specs[name], say)

    def _start_together(self, specs: list[ComponentSpec], say: Callable[[str], None]) -> None:
        default_log_dir(), run_dir()  # each made once, before the threads race for them
        pool = ThreadPoolExecutor(len(specs))
        futures = [pool.submit(self._start, spec, say) for spec in specs]
        try:
            for future in futures:
                future.result()  # the first start that failed raises here
        except BaseException:
            # A failed start, or Ctrl-C / a cell interrupt: stop the starts still waiting, and
            # let every thread finish, so that shutdown() sees (and stops) every process.
            self._cancel.set()
            wait_uninterrupted(futures)
            raise
        finally:
            pool.shutdown(wait=False)

    def _start(self, spec: ComponentSpec, say: Callable[[str], None]) -> None:
        t0 = time.monotonic()
        process = ComponentProcess.start(
            spec.name,
            spec.target,
            spec.kwargs,
            self.addresses.rpc(spec.name),
            env=spec.env,
            log_dir=log_dir_of(self.config),
            allow_remote=self.config.allow_remote,
            ready_timeout_s=READY_TIMEOUT_S,
            cancel=self._cancel,
            http_port=spec.http_port,
            http_host=self.config.host,
            http_api_key=self.config.api_key,
            keys=self.keys,
        )
        self.specs[spec.name], self.processes[spec.name] = spec, process
        say(f"{spec.name} ready in {time.monotonic() - t0:.1f} s (pid {process.pid})\n")

    # -- using it ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The frontend's base URL (``/v1`` is the OpenAI API under it)."""
        return self.config.urls()["frontend"].removesuffix("/health")

    def urls(self) -> dict[str, str]:
        """Every component's ``/health`` URL."""
        return self.config.urls()

    def client(self, **kwargs: Any) -> openai.OpenAI:
        """An ``openai.OpenAI`` client bound to the frontend (kwargs go to its constructor)."""
        import openai

        kwargs.setdefault("api_key", self.config.api_key or "modkit")
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=f"{self.url}/v1", **kwargs)

    def health(self) -> dict[str, dict[str, Any]]:
        """``GET /health`` of every component, over HTTP: {name: body, with "http_status"}.

        A component that does not answer and that the supervisor is restarting, or gave up on,
        has ``status`` "restarting" or "failed" (see ``down``).
        """
        health = {name: self._get(url) for name, url in self.urls().items()}
        for name, state in self.down().items():
            if name in health and health[name]["http_status"] != 200:
                health[name]["status"] = state
        return health

    def down(self) -> dict[str, str]:
        """The components that do not serve now: {name: "restarting" or "failed"} while the
        supervisor runs; without it, {name: "exited"} for each process that has exited."""
        if self.supervisor.running:
            return self.supervisor.states()
        return {name: "exited" for name, p in list(self.processes.items()) if p.returncode is not None}

    def stats(self) -> dict[str, dict[str, Any]]:
        """``GET /stats`` of every component, over HTTP."""
        return {name: self._get(url.removesuffix("/health") + "/stats") for name, url in self.urls().items()}

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        """Wait until every ``/health`` answers 200 and the router's subscription to the KV cache
        manager's events has arrived (ZeroMQ drops events published before it: the router would
        route cold); RuntimeError naming those that are not ready. A frontend that says
        "degraded" serves (what it names is waited for on its own), and while the supervisor
        runs, a component whose process exited is its to restart, not waited for here."""
        deadline = time.monotonic() + timeout_s
        while True:
            health = self.health()
            sick = {n: h for n, h in health.items() if not _serving(h) and not self._left_to_supervisor(n)}
            if not health.get("kv_cache_manager", {}).get("kv_events_subscribed", True):
                sick["kv_cache_manager"] = {"kv_events_subscribed": False}
            if not sick:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"components not healthy after {timeout_s:g} s: {sick}")
            time.sleep(0.1)

    # -- the event stream ------------------------------------------------------------------

    def events(self, timeout_s: float = 10.0) -> EventStream:
        """A new subscription to every component's events (``modkit.trace.events``); iterate it, or ``recv()``.

        It returns once every publisher has confirmed the subscription, so nothing that
        happens afterwards is missed. Close it when done (or use it in a ``with``).
        """
        workers = [worker_name(i) for i in range(self.config.num_workers)]
        names = ["scheduler", "router", "kv_cache_manager", "frontend", "sampler", *workers]
        endpoints = {n: (self.addresses.events(n), self.addresses.rpc(n)) for n in names}
        return EventStream(endpoints, timeout_s, keys=self.keys)

    def trace(self, settle_s: float = 0.1) -> Trace:
        """What the recorder kept since launch (or ``clear_trace``): DataFrames of steps, requests, blocks...

        First waits until every event published before the call is recorded (``Recorder.catch_up``:
        the events of requests that just returned are in), then until none came for ``settle_s``
        (2 s at most: work still under way); 0 takes the snapshot at once (live views). A
        component that did not answer within 2 s, or catch up within 30 s, is named in
        ``meta["behind"]``.
        """
        if self.recorder is None:
            raise RuntimeError("this pipeline was launched with record=False: subscribe with events() instead")
        behind: set[str] = set()
        if settle_s > 0:
            behind = self.recorder.catch_up()
            self.recorder.settle(settle_s)
        trace = self.recorder.trace()
        if behind:
            trace.meta["behind"] = sorted(behind)
        now, then = self._cpu_seconds(), self._cpu_at_clear
        if now and now.keys() == then.keys():  # the same processes (name and pid): none restarted since
            trace.meta["cpu_s"] = {name: now[name, pid] - then[name, pid] for name, pid in now}
        return trace

    def clear_trace(self) -> None:
        """Start the next ``trace()`` from now (its times count from now, too)."""
        if self.recorder is not None:
            self.recorder.clear()
            self._cpu_at_clear = self._cpu_seconds()

    def _cpu_seconds(self) -> dict[tuple[str, int], float]:
        """(name, pid) -> CPU seconds each process has used so far, this one (the recorder, and a
        client run here) as ``launcher``; a trace's ``meta["cpu_s"]`` is what they used in its
        time. Empty off Linux, or if a process is gone."""
        pids = {**self.pids(), "launcher": os.getpid()}
        seconds = {(name, pid): cpu_seconds(pid) for name, pid in pids.items()}
        return {} if None in seconds.values() else {key: s for key, s in seconds.items() if s is not None}

    def _trace_meta(self) -> dict[str, Any]:
        cfg = self.config
        on_gpu = on_cuda(cfg.worker_device(0))
        threads = int(worker_threads_env(cfg)["OMP_NUM_THREADS"])
        split_from = None if on_gpu else cfg.worker_parallel_min_tokens(threads)  # as each worker runs its steps
        return {
            "model": self.model_name,
            "num_workers": cfg.num_workers,
            "prefill_workers": cfg.prefill_workers,  # workers 0 .. P-1 compute prompts (0: aggregated)
            "decode_workers": cfg.decode_workers,
            "num_blocks": list(self.num_blocks),
            "block_size": cfg.block_size,
            "max_num_batched_tokens": cfg.max_num_batched_tokens,
            "max_num_seqs": cfg.max_num_seqs,
            "max_model_len": self.max_model_len,
            "enable_prefix_caching": cfg.enable_prefix_caching,
            "scheduling_policy": cfg.scheduling_policy,
            "eviction_policy": cfg.eviction_policy,
            "router_policy": cfg.router_policy,
            # What a cost model fitted on this run was measured under (modkit.sim.cost_model.FITTED_ON).
            "device": "cuda" if on_gpu else "cpu",
            "worker_threads": threads,  # each worker's OpenMP threads
            "cpu_parallel_min_tokens": split_from,  # a CPU worker's smaller steps ran on one thread
            "usable_cores": usable_cores(),
        }

    def _left_to_supervisor(self, component: str) -> bool:
        """A component whose process exited while the supervisor runs: not waited for, the
        supervisor restarts it (or has given up on it)."""
        process = self.processes.get(component)
        return self.supervisor.running and process is not None and process.returncode is not None

    def logs(self, component: str, lines: int = 50) -> str:
        """The last ``lines`` lines a component wrote (stdout and stderr)."""
        return self._process(component).log_tail(lines)

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.processes.items()}

    @_exclusive
    def restart(self, component: str, timeout_s: float = 10.0, target: str | None = None) -> None:
        """Stop one component and start it again with the same settings (from ``target``,
        "package.module:Class" with the same constructor, if given).

        Requests in flight carry on, or end with an error: after a router or scheduler
        restart the frontend sends every request in flight again, with its outputs so far
        (``FrontendService.resubmit``), and the scheduler adds those it lost; a restarted KV
        cache manager makes the scheduler recompute what ran (``modkit.scheduler.service``); a
        restarted worker's requests move to another worker, or fail (the router notices the
        gap in its heartbeats), and it comes back with an empty cache; a restarted frontend's
        clients lose their connections, and their requests are aborted. Prints nothing;
        raises if the component does not come back.
        """
        process = self._process(component)
        process.stop(timeout_s)
        if target is not None:
            self.specs[component] = dataclasses.replace(self.specs[component], target=target)
        self._start(self.specs[component], progress_printer(False))
        self.wait_healthy()
        if component in ("router", "scheduler") and "frontend" in self.processes:
            with self.processes["frontend"].client(timeout_s=15.0) as rpc:
                rpc.call("resubmit")  # what the old one had and had not finished, sent again

    SWAPPABLE = SWAPPABLE

    @_exclusive
    def swap(self, component: str, impl: str | type, allow_remote_code: bool = False) -> dict[str, Any]:
        """Put another implementation in charge of ``component``, between two of its steps, while it serves.

        ``component``: one of ``SWAPPABLE`` (see ``modkit.pipeline.swapping`` for what each
        swaps). ``impl``: a name from that component's registry (``"sjf"``, ``"lfu"``), an
        import path (``"package.module:Class"``, imported there), or a class, e.g. one defined
        in a notebook cell, sent by value (cloudpickled and signed with this launch's key; the
        receiver checks the signature before unpickling). Requests in flight carry on.
        If the new implementation fails its trial, nothing changes and the error is raised
        here (``RemoteError``, with the remote traceback); if it raises later, the previous
        one is put back and ``health()`` shows ``last_swap_error``. Classes are not sent to a
        component on a non-loopback address unless ``allow_remote_code``.
        """
        return swap_component(self, component, impl, allow_remote_code)

    def hold_requests(self, hold: bool = True) -> int:
        """While held, new requests wait at the scheduler; ``hold_requests(False)`` lets them all in
        at once, in the order they came. Returns how many are held now.

        For experiments that need every request of a burst in one queue before the first
        step (so that two policies face the same choice, whatever the machine's speed).
        """
        with self._process("scheduler").client(timeout_s=10.0) as rpc:
            return int(rpc.call("hold_new_requests", hold)["held"])

    def wait_held(self, n: int, requests: Iterable[Future[Any]] = (), timeout_s: float = 60.0) -> int:
        """Wait until ``n`` requests are held at the scheduler (see ``hold_requests``, which this
        keeps on); returns how many are.

        ``requests``: the futures of the calls that sent them. A request that ends before it is
        held never will be: its own error is raised here (a 400 from the frontend, a lost
        connection), or a RuntimeError if it ended well (the hold was lifted meanwhile, e.g. by
        a scheduler restart). TimeoutError after ``timeout_s``, naming how many arrived.
        """
        requests = list(requests)
        deadline = time.monotonic() + timeout_s
        with self._process("scheduler").client(timeout_s=10.0) as rpc:
            while (held := int(rpc.call("hold_new_requests", True)["held"])) < n:
                for future in requests:
                    if future.done():
                        future.result()  # raises the request's own error
                        raise RuntimeError("a request finished before it was held: the scheduler is not holding")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{held} of {n} requests held at the scheduler after {timeout_s:g} s")
                time.sleep(0.005)
        return held

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Refuse new requests (503) and wait up to ``timeout_s`` for those in flight; True if all finished."""
        if "frontend" not in self.processes:
            return True
        deadline = time.monotonic() + timeout_s
        with self.processes["frontend"].client(timeout_s=5.0) as rpc:
            in_flight = int(rpc.call("drain"))
            while in_flight and time.monotonic() < deadline:
                time.sleep(0.1)
                in_flight = int(rpc.call("stats")["num_requests_in_flight"])
        return in_flight == 0

    def shutdown(self, timeout_s: float = 5.0, drain_timeout_s: float = 0.0) -> None:
        """Stop the supervisor, then every component (frontend first), and free every port and
        socket file. Idempotent.

        With ``drain_timeout_s`` > 0, first ``drain``: requests in flight finish (for that long
        at most) while new ones get 503.
        """
        if self._closed:
            return
        self._cancel.set()  # a restart the supervisor has under way gives up within 0.1 s
        self.supervisor.stop()
        with self._lock:
            if self._closed:  # another thread shut it down meanwhile
                return
            if drain_timeout_s > 0:
                with contextlib.suppress(Exception):  # a frontend that cannot drain is stopped all the same
                    self.drain(drain_timeout_s)
            self._closed = True
            if self.recorder is not None:
                self.recorder.close()
            self._finalizer.detach()
            stop_all(self.processes, self.addresses.ipc_dir, timeout_s)

    def _process(self, component: str) -> ComponentProcess:
        if component not in self.processes:
            raise KeyError(f"no component {component!r}; components: {', '.join(self.processes)}")
        return self.processes[component]

    def _get(self, url: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
                return {**json.loads(response.read()), "http_status": response.status}
        except urllib.error.HTTPError as error:
            try:
                body = json.loads(error.read())
            except ValueError:
                body = {}
            return {**body, "http_status": error.code}
        except OSError as error:  # refused, timed out: the process is gone or not listening
            return {"status": "unreachable", "error": str(error), "http_status": None}

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        states = ", ".join(f"{n}={p.state()}" for n, p in self.processes.items())
        return f"Pipeline({self.url}, {states or 'stopped'})"


def _serving(health: dict[str, Any]) -> bool:
    """200, or the frontend's "degraded" (it serves; what it names as down is checked on its own)."""
    return health.get("http_status") == 200 or health.get("status") == "degraded"
