"""The sampler process: owns which sampling implementation the workers run, and its statistics.

Logits stay in the worker that computed them (a socket hop per step for a
``(batch, vocab)`` float tensor would cost more than the sampling). So this process is
the sampler's control plane: each worker asks it for ``config()`` when it starts and runs
that implementation next to its logits; after each step the worker pushes a
``SamplerReport`` here, and ``stats()`` adds them up per worker.
"""

from __future__ import annotations

import time
from typing import Any

from modkit.config import PipelineConfig
from modkit.pipeline.addresses import PipelineAddresses
from modkit.protocol import SamplerReport
from modkit.sampler.interface import SAMPLERS
from modkit.transport import Inbox


class SamplerService:
    def __init__(self, config: dict[str, Any], ipc_dir: str) -> None:
        cfg = PipelineConfig.from_dict(config)
        SAMPLERS.get(cfg.sampler)  # an unknown name fails the start, with the registry's message
        self.implementation, self.seed = cfg.sampler, cfg.seed
        self.started = time.time()
        self.inbox = Inbox(
            PipelineAddresses(ipc_dir, cfg.addresses or {}).inbox("sampler"), allow_remote=cfg.allow_remote
        )
        self.per_worker: dict[int, dict[str, float]] = {}

    def config(self) -> dict[str, Any]:
        """What every worker runs: the registered implementation's name, and the default seed."""
        return {"implementation": self.implementation, "seed": self.seed}

    def wait_sockets(self) -> list[Inbox]:
        return [self.inbox]

    def run_once(self) -> bool:
        for report in self.inbox.drain():
            if isinstance(report, SamplerReport):
                totals = self.per_worker.setdefault(
                    report.worker_id, {"num_tokens": 0, "num_greedy": 0, "num_steps": 0, "seconds": 0.0}
                )
                totals["num_tokens"] += report.num_tokens
                totals["num_greedy"] += report.num_greedy
                totals["num_steps"] += 1
                totals["seconds"] += report.seconds
        return False

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "component": "sampler",
            "implementation": self.implementation,
            "uptime_s": round(time.time() - self.started, 3),
        }

    def stats(self) -> dict[str, Any]:
        tokens = sum(int(w["num_tokens"]) for w in self.per_worker.values())
        seconds = sum(w["seconds"] for w in self.per_worker.values())
        return {
            "num_tokens_sampled": tokens,
            "sample_s_total": seconds,
            "us_per_token": 1e6 * seconds / tokens if tokens else 0.0,
            "workers": {str(k): v for k, v in sorted(self.per_worker.items())},
        }

    def close(self) -> None:
        self.inbox.close()
