"""The sampler process: owns which sampling implementation the workers run, and its statistics.

Logits stay in the worker that computed them (a socket hop per step for a
``(batch, vocab)`` float tensor would cost more than the sampling). So this process is
the sampler's control plane: each worker asks it for ``config()`` when it starts and runs
that implementation next to its logits; after each step the worker pushes a
``SamplerReport`` here, and ``stats()`` adds them up per worker.

A swap (``Pipeline.swap("sampler", ...)``) comes here: the new implementation is tried on
a probe batch in this process, then each worker is told to ``use_sampler`` (it tries the
sampler again on its own device, and switches between two steps). If a worker refuses,
the workers that had switched are switched back and the error goes to the caller. A
worker whose new sampler raises in a step answers that step with the old one and says so
(``SwapRolledBack``); this process then puts the old one back on every worker.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from modkit.config import PipelineConfig
from modkit.guard import SwapOwner, trial
from modkit.pipeline.addresses import PipelineAddresses, worker_name
from modkit.protocol import SamplerReport, SwapRolledBack
from modkit.sampler.interface import SAMPLERS
from modkit.sampler.swaps import try_sampler
from modkit.swap import ImplSpec, resolve
from modkit.trace.events import EventPublisher, Swapped
from modkit.transport import Inbox, RpcClient

WORKER_RPC_TIMEOUT_S = 30.0


class SamplerService(SwapOwner):
    def __init__(self, config: dict[str, Any], ipc_dir: str, swap_key: str | None = None) -> None:
        cfg = PipelineConfig.from_dict(config)
        SAMPLERS.get(cfg.sampler)  # an unknown name fails the start, with the registry's message
        self.implementation, self.seed = cfg.sampler, cfg.seed
        self.spec = ImplSpec(name=cfg.sampler)  # what workers run: a name, an import path or signed code
        self.previous: tuple[str, ImplSpec] = (self.implementation, self.spec)
        self.swap_key = swap_key  # verifies classes sent by value (modkit.swap); None: none accepted
        self.last_swap_error: str | None = None
        self.started = time.time()
        self.addresses = PipelineAddresses(ipc_dir, cfg.addresses or {})
        self.num_workers = cfg.num_workers
        self.inbox = Inbox(self.addresses.inbox("sampler"), allow_remote=cfg.allow_remote)
        self.events = EventPublisher("sampler", self.addresses.events("sampler"), cfg.allow_remote)
        self.per_worker: dict[int, dict[str, float]] = {}

    def config(self) -> dict[str, Any]:
        """What every worker runs: the implementation (name and how to get it), and the default seed."""
        return {"implementation": self.implementation, "spec": self.spec, "seed": self.seed}

    def wait_sockets(self) -> list[Inbox]:
        return [self.inbox]

    def run_once(self) -> bool:
        for message in self.inbox.drain():
            if isinstance(message, SamplerReport):
                totals = self.per_worker.setdefault(
                    message.worker_id,
                    {"num_tokens": 0, "num_greedy": 0, "num_constrained": 0, "num_steps": 0, "seconds": 0.0},
                )
                totals["num_tokens"] += message.num_tokens
                totals["num_greedy"] += message.num_greedy
                totals["num_constrained"] += message.num_constrained
                totals["num_steps"] += 1
                totals["seconds"] += message.seconds
            elif isinstance(message, SwapRolledBack):
                self._roll_back(message)
        return False

    # -- swapping ------------------------------------------------------------------------

    def swap(self, spec: ImplSpec) -> dict[str, Any]:
        """Make every worker sample with another implementation, between two of its steps."""
        cls = resolve(spec, SAMPLERS.get, self.swap_key)
        # Here on a CPU and a small vocabulary, before any worker is asked; each worker tries it again on its device.
        trial(cls(seed=self.seed), lambda s: try_sampler(s, vocab_size=64, device=torch.device("cpu")))
        switched: list[int] = []
        try:
            for worker_id in range(self.num_workers):
                self._tell(worker_id, spec)
                switched.append(worker_id)
        except Exception:
            for worker_id in switched:  # all or none
                self._tell(worker_id, self.spec, guarded=False)
            raise
        previous = self.implementation
        self.previous = (self.implementation, self.spec)
        self.implementation, self.spec = spec.label(cls), spec
        self._swapped_in("sampler", self.implementation, previous)
        return {"implementation": self.implementation, "previous": previous}

    def _tell(self, worker_id: int, spec: ImplSpec, guarded: bool = True) -> None:
        with RpcClient(self.addresses.rpc(worker_name(worker_id)), timeout_s=WORKER_RPC_TIMEOUT_S) as rpc:
            rpc.call("use_sampler", spec, self.seed, guarded)

    def _roll_back(self, message: SwapRolledBack) -> None:
        """One worker's new sampler failed (its guard answered with the old one): every worker goes back to it."""
        if self.spec == self.previous[1]:
            return  # already rolled back, on another worker's word
        failed = self.implementation
        self.implementation, self.spec = self.previous
        why = f"worker {message.worker_id}: {message.error}"
        for worker_id in range(self.num_workers):
            if worker_id != message.worker_id:  # that one has put its previous sampler back already
                try:
                    self._tell(worker_id, self.spec, guarded=False)
                except Exception as error:  # a worker that is down gets the right one from config() when it restarts
                    why += f"; worker {worker_id} not told: {error}"
        self._rolled_back("sampler", self.implementation, failed, why)

    def _publish_swapped(self, event: Swapped) -> None:
        self.events.publish("swap.sampler", event)

    # -- observing -----------------------------------------------------------------------

    def announce_events(self, token: str) -> None:
        """Publish ``Hello(token)``: tells a new subscriber that its subscription arrived."""
        self.events.announce(token)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "component": "sampler",
            "implementation": self.implementation,
            "last_swap_error": self.last_swap_error,
            "uptime_s": round(time.time() - self.started, 3),
        }

    def stats(self) -> dict[str, Any]:
        tokens = sum(int(w["num_tokens"]) for w in self.per_worker.values())
        seconds = sum(w["seconds"] for w in self.per_worker.values())
        return {
            "num_tokens_sampled": tokens,
            "num_tokens_constrained": sum(int(w["num_constrained"]) for w in self.per_worker.values()),
            "sample_s_total": seconds,
            "us_per_token": 1e6 * seconds / tokens if tokens else 0.0,
            "workers": {str(k): v for k, v in sorted(self.per_worker.items())},
        }

    def close(self) -> None:
        self.inbox.close()
        self.events.close()
