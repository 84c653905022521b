"""The supervisor: a thread of the launcher that restarts a component whose process died.

Every ``CHECK_INTERVAL_S`` it looks at each component's process (``ComponentProcess.state``):

- *exited*: the process is gone (killed, crashed, out of memory);
- *unresponsive* for longer than ``restart_unresponsive_after_s``: hung. A heartbeat is
  sent between two turns of the serve loop, so a long forward or a slow call delays it for
  a while; only a silence far longer than any step counts. (A model that loads slowly is no
  concern here: a process is watched only once it is ready.)

A hung process is SIGKILLed when found. A component found dead is *down* until it serves
again. The supervisor restarts it with
``Pipeline.restart`` (the same settings, and whatever a restart tells the others), one at a
time, under the pipeline's lock, so it never races a ``restart``, ``swap`` or ``shutdown``
of the user's. The first restart is at once; within ``restart_window_s``, each further one
waits ``restart_backoff_s``, then twice as long each time (``MAX_BACKOFF_S`` at most). A
dead worker is restarted only once the router has marked it dead (no heartbeat for 3 s;
``ROUTER_NOTICE_S`` at most): the router and scheduler learn of a death only from the gap in
its heartbeats, and a new worker's heartbeats would hide it, leaving the requests it ran
waiting for ever instead of moving to another worker (or failing, if there is none).
After ``max_restarts`` restarts in the window, the next death is final: the component is
*failed*, the supervisor says so and leaves it (``Pipeline.restart`` by hand tries again
and, if it serves, puts it back in the supervisor's care).

While anything is down or failed, the frontend's ``/health`` says ``degraded`` (503) and
names it: the supervisor tells the frontend over RPC (``set_down``). ``Pipeline.down()``
and ``Pipeline.health()`` show it too; start_all prints each change.

Its lines (a restart, a component back, a give-up) go to the launch's progress printer when
the launch prints progress (a terminal, a notebook cell: one short line each), else to the
``modkit.pipeline.supervisor`` logger.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from modkit.config import PipelineConfig

if TYPE_CHECKING:
    from modkit.pipeline.launcher import Pipeline
    from modkit.transport import ComponentProcess

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 0.2
MAX_BACKOFF_S = 60.0
SET_DOWN_TIMEOUT_S = 2.0
ROUTER_NOTICE_S = 10.0  # how long a dead worker's restart waits for the router to mark it dead


@dataclass(slots=True)
class Down:
    """A component the supervisor found dead, until it serves again."""

    why: str  # "exited with code -9", "unresponsive for 301 s"
    since: float  # time.monotonic() when noticed
    next_try: float  # when the next restart may start
    failed: ComponentProcess | None = None  # given up: the dead process it gave up on


@dataclass(slots=True)
class Supervisor:
    """Watches one pipeline from a daemon thread; ``start`` it once the pipeline serves, ``stop`` before
    shutting the pipeline down. It holds the pipeline only weakly: a pipeline nobody holds is collected
    (and stopped by its finalizer) as if it had no supervisor."""

    config: PipelineConfig
    say: Callable[[str], None] | None = None  # None: lines go to the logger
    down: dict[str, Down] = field(default_factory=dict)
    restarts: dict[str, list[float]] = field(default_factory=dict)  # when each restart began, per component
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _told: tuple[object, list[str]] | None = None  # (frontend process, the down list it was last told)

    def start(self, pipeline: Pipeline) -> None:
        ref = weakref.ref(pipeline)
        self._thread = threading.Thread(target=self._run, args=(ref,), name="modkit-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; returns once the thread has left (a restart in progress is cut short
        by the pipeline's cancel event, which ``shutdown`` sets first)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stop.is_set()

    def states(self) -> dict[str, str]:
        """What is down now: {name: "restarting" or "failed"}."""
        down = self.down.copy()  # NOTE: asked from other threads; copy() is atomic, iterating the live dict is not
        return {name: "failed" if d.failed is not None else "restarting" for name, d in down.items()}

    def _run(self, ref: weakref.ref[Pipeline]) -> None:
        while not self._stop.wait(CHECK_INTERVAL_S):
            pipeline = ref()
            if pipeline is None:
                return
            try:
                self.check(pipeline)
            except Exception:  # the supervisor must outlive any one failure; the next check tries again
                log.exception("supervisor check failed")
            del pipeline  # not held between checks

    def check(self, pipeline: Pipeline) -> None:
        """One look at every component: note the dead, tell the frontend, restart what is due."""
        with pipeline._lock:
            if self._stop.is_set():
                return
            for name, process in pipeline.processes.items():
                self._note(name, process)
            self._tell_frontend(pipeline)
            now = time.monotonic()
            due = [n for n, d in self.down.items() if d.failed is None and d.next_try <= now]
            due = [n for n in due if self._router_noticed(pipeline, n)]
            if due:
                self._restart(pipeline, due[0])  # one at a time: the next check takes the next
                self._tell_frontend(pipeline)

    def _note(self, name: str, process: ComponentProcess) -> None:
        down = self.down.get(name)
        if down is not None and down.failed is not None and down.failed is not process:
            del self.down[name]  # restarted by hand since the supervisor gave up: watched again
            self.restarts.pop(name, None)
            down = None
        why = self._why_dead(process)
        if why is None:
            if down is not None and down.failed is None:
                del self.down[name]  # it serves again (restarted by hand meanwhile)
            return
        if down is None:
            if process.returncode is None:  # hung: it would not answer a polite shutdown
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
            now = time.monotonic()
            self.down[name] = Down(why, now, now + self._backoff(name))
            if self._restarts_left(name):
                self._tell(logging.WARNING, f"{name} {why}; " + self._plan(name))
            else:
                self._give_up(name, process)

    def _why_dead(self, process: ComponentProcess) -> str | None:
        code = process.returncode
        if code is not None:
            return f"exited with code {code}"
        limit = self.config.restart_unresponsive_after_s
        if limit is not None and (age := process.heartbeat_age()) > limit:
            return f"unresponsive for {age:.0f} s"
        return None

    def _recent(self, name: str) -> list[float]:
        """When the restarts within the window began."""
        horizon = time.monotonic() - self.config.restart_window_s
        recent = [t for t in self.restarts.get(name, []) if t > horizon]
        self.restarts[name] = recent
        return recent

    def _backoff(self, name: str) -> float:
        n = len(self._recent(name))
        return 0.0 if n == 0 else min(MAX_BACKOFF_S, self.config.restart_backoff_s * 2 ** (n - 1))

    def _restarts_left(self, name: str) -> bool:
        return len(self._recent(name)) < self.config.max_restarts

    def _plan(self, name: str) -> str:
        wait, n = self._backoff(name), len(self._recent(name))
        when = "" if wait == 0 else f" in {wait:g} s"
        return f"restarting it{when} ({n + 1} of {self.config.max_restarts} in {self.config.restart_window_s:g} s)"

    def _give_up(self, name: str, process: ComponentProcess) -> None:
        down = self.down[name]
        down.failed = process
        self._tell(
            logging.ERROR,
            f"{name} {down.why}; failed for good after {len(self._recent(name))} restarts in "
            f"{self.config.restart_window_s:g} s (its log: {process.log_path}); p.restart({name!r}) tries again",
        )

    def _restart(self, pipeline: Pipeline, name: str) -> None:
        down = self.down[name]
        self._recent(name).append(time.monotonic())
        t0 = time.monotonic()
        try:
            pipeline.restart(name)
        except Exception as error:
            if self._stop.is_set():
                return  # shutdown cut the restart short
            down.why = f"did not restart ({str(error).splitlines()[0]})"
            if not self._restarts_left(name):
                self._give_up(name, pipeline.processes[name])
                return
            down.next_try = time.monotonic() + self._backoff(name)
            self._tell(logging.WARNING, f"{name} {down.why}; " + self._plan(name))
            return
        del self.down[name]
        back, now = pipeline.processes[name], time.monotonic()
        self._tell(
            logging.INFO,
            f"{name} is back (pid {back.pid}; restarted in {now - t0:.1f} s, down {now - down.since:.1f} s)",
        )

    def _router_noticed(self, pipeline: Pipeline, name: str) -> bool:
        """For a worker: whether the router has marked it dead (or ``ROUTER_NOTICE_S`` has passed, or
        there is no router to ask). True for any other component."""
        router = pipeline.processes.get("router")
        if not name.startswith("worker-") or router is None or "router" in self.down:
            return True
        if time.monotonic() - self.down[name].since > ROUTER_NOTICE_S:
            return True
        try:
            with router.client(timeout_s=1.0) as rpc:
                alive = rpc.call("health")["workers_alive"]
        except Exception:  # busy: asked again at the next check (ROUTER_NOTICE_S bounds the wait)
            return False
        return int(name.removeprefix("worker-")) not in alive

    def _tell_frontend(self, pipeline: Pipeline) -> None:
        """Send the frontend the list of what is down, when it changed or the frontend is new."""
        frontend = pipeline.processes.get("frontend")
        if frontend is None or "frontend" in self.down:
            return
        names = sorted(self.down)
        if self._told == (frontend, names):
            return
        try:
            with frontend.client(timeout_s=SET_DOWN_TIMEOUT_S) as rpc:
                rpc.call("set_down", names)
        except Exception as error:  # a frontend that cannot answer now is told at the next check
            log.info("could not tell the frontend what is down: %r", error)
            return
        self._told = (frontend, names)

    def _tell(self, level: int, line: str) -> None:
        if self.say is not None:
            self.say(f"supervisor: {line}\n")
        else:
            log.log(level, line)
