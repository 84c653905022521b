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
``sampler.in``             PULL    workers (``SamplerReport``)
``kv.events``              PUB     the KV cache manager's block events, topic ``worker.<i>``
=========================  ======  ==========================================================
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

COMPONENT_ORDER = ("sampler", "worker", "kv_cache_manager", "scheduler", "router", "frontend")  # start order


def worker_name(worker_id: int) -> str:
    return f"worker-{worker_id}"


@dataclass(frozen=True, slots=True)
class PipelineAddresses:
    ipc_dir: str

    @classmethod
    def fresh(cls) -> PipelineAddresses:
        """A new private directory (mode 0700) for one launch."""
        return cls(tempfile.mkdtemp(prefix="modkit-ipc-"))

    @classmethod
    def at(cls, ipc_dir: str) -> PipelineAddresses:
        """A given directory, created (mode 0700) if missing; for components started by hand.

        PermissionError if another user owns it: whoever can write there could bind the
        pipeline's sockets first.
        """
        path = Path(ipc_dir)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.stat().st_uid != os.getuid():
            raise PermissionError(f"ipc_dir {ipc_dir!r} belongs to another user; use a directory of your own")
        path.chmod(0o700)
        return cls(os.path.abspath(ipc_dir))

    def _ipc(self, name: str) -> str:
        return f"ipc://{self.ipc_dir}/{name}"

    def rpc(self, component: str) -> str:
        return self._ipc(f"{component}.rpc")

    def inbox(self, component: str) -> str:
        return self._ipc(f"{component}.in")

    @property
    def kv_events(self) -> str:
        return self._ipc("kv.events")
