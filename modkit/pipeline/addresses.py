"""Where each pipeline component listens, inside one directory of ``ipc://`` socket files.

Every component derives its peers' addresses from the same directory, so the launcher
hands each one a single string (``ipc_dir``) and a component started by hand
(``python -m modkit.worker --ipc-dir DIR ...``) finds the others the same way. The
directory is made with mode 0700: only this user can connect (see
``modkit.transport.addresses``).

=========================  ======  ==========================================================
socket                     kind    who talks to it
=========================  ======  ==========================================================
``<component>.rpc``        RPC     health, stats; the KV cache manager's ``apply``
``router.in``              PULL    frontend (requests, aborts), scheduler, workers (heartbeats)
``scheduler.in``           PULL    router (requests), workers (``StepDone``)
``worker-<i>.in``          PULL    scheduler (``StepPlan``)
``frontend.in``            PULL    scheduler (``EngineOutputs``), router (rejections)
``sampler.in``             PULL    workers (``SamplerReport``, ``SwapRolledBack``)
``kv.events``              PUB     the KV cache manager's block events: vLLM's on ``worker.<i>``
                                   (the router), modkit's on ``blocks.<i>`` (views, traces)
``<component>.ev``         PUB     scheduler, router, workers, frontend, sampler: the event stream
                                   (``modkit.trace.events``)
=========================  ======  ==========================================================
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from modkit.transport.addresses import tcp_address
from modkit.transport.rundirs import write_owner

COMPONENT_ORDER = ("sampler", "worker", "kv_cache_manager", "scheduler", "router", "frontend")  # start order


def worker_name(worker_id: int) -> str:
    return f"worker-{worker_id}"


def socket_names(num_workers: int) -> list[str]:
    """Every socket of a pipeline with ``num_workers`` workers, by the names of the table above."""
    components = ["frontend", "router", "scheduler", "kv_cache_manager", "sampler"]
    components += [worker_name(i) for i in range(num_workers)]
    inboxes = ["router", "scheduler", "frontend", "sampler", *(worker_name(i) for i in range(num_workers))]
    publishers = ["scheduler", "router", "frontend", "sampler", *(worker_name(i) for i in range(num_workers))]
    return (
        [f"{c}.rpc" for c in components]
        + [f"{c}.in" for c in inboxes]
        + [f"{c}.ev" for c in publishers]
        + ["kv.events"]
    )


def owner(socket: str) -> str:
    """The component that binds ``socket`` (``"worker-1.in"`` -> ``"worker-1"``, ``"kv.events"`` -> the KV manager)."""
    name = socket.rpartition(".")[0]
    return "kv_cache_manager" if name == "kv" else name


def tcp_addresses(
    num_workers: int, first_port: int, host: str = "127.0.0.1", hosts: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Every socket of the pipeline on TCP, for ``PipelineConfig.addresses``: ports from
    ``first_port`` on, one each, on ``host``, or on ``hosts[component]`` for the components
    it names (``{"worker-0": "10.0.0.7"}``: the host that component runs on, where it binds)."""
    hosts = hosts or {}
    names = socket_names(num_workers)
    return {name: tcp_address(first_port + i, hosts.get(owner(name), host)) for i, name in enumerate(names)}


@dataclass(frozen=True, slots=True)
class PipelineAddresses:
    """``ipc_dir/<name>`` for each socket, unless ``overrides`` gives it another endpoint.

    Overrides (``PipelineConfig.addresses``) put sockets on TCP, e.g. to run a worker in
    another container: ``{"worker-1.in": "tcp://10.0.0.7:9100", "scheduler.in":
    "tcp://10.0.0.2:9000", ...}``; each component binds its own and connects to the others.
    """

    ipc_dir: str
    overrides: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def fresh(cls, overrides: Mapping[str, str] | None = None) -> PipelineAddresses:
        """A new private directory (mode 0700) for one launch, with an owner file: if the launcher
        is killed, a later launch removes the directory (``modkit.transport.rundirs``)."""
        ipc_dir = tempfile.mkdtemp(prefix="modkit-ipc-")
        write_owner(Path(ipc_dir))
        return cls(ipc_dir, dict(overrides or {}))

    @classmethod
    def at(cls, ipc_dir: str, overrides: Mapping[str, str] | None = None) -> PipelineAddresses:
        """A given directory, created (mode 0700) if missing; for components started by hand.

        PermissionError if another user owns it: whoever can write there could bind the
        pipeline's sockets first.
        """
        path = Path(ipc_dir)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.stat().st_uid != os.getuid():
            raise PermissionError(f"ipc_dir {ipc_dir!r} belongs to another user; use a directory of your own")
        path.chmod(0o700)
        return cls(os.path.abspath(ipc_dir), dict(overrides or {}))

    def _ipc(self, name: str) -> str:
        return self.overrides.get(name) or f"ipc://{self.ipc_dir}/{name}"

    def rpc(self, component: str) -> str:
        return self._ipc(f"{component}.rpc")

    def inbox(self, component: str) -> str:
        return self._ipc(f"{component}.in")

    @property
    def kv_events(self) -> str:
        return self._ipc("kv.events")

    def events(self, component: str) -> str:
        """Where ``component`` publishes its part of the event stream (the KV manager: ``kv_events``)."""
        return self.kv_events if component == "kv_cache_manager" else self._ipc(f"{component}.ev")
