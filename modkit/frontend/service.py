"""The frontend process: the OpenAI API (FastAPI on uvicorn) in front of the pipeline.

uvicorn runs the app on a thread of this process, on its own asyncio loop, where
``PipelineClient`` sends requests to the router and receives outputs from the scheduler.
The process's main thread runs the usual serve loop (RPC ``health`` and ``stats`` for the
launcher, heartbeats). The app's own ``GET /health`` on the frontend port answers 503
once the output loop has failed, and until the router has heard a worker (``starting``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

from modkit.config import PipelineConfig
from modkit.frontend import EMBEDDED_MODEL_NAME
from modkit.frontend.app import KEEP_ALIVE_S, build_app
from modkit.frontend.pipeline_client import PipelineClient
from modkit.model import load_tokenizer, resolve_model_path
from modkit.model.config import ModelConfig
from modkit.pipeline.addresses import PipelineAddresses

START_TIMEOUT_S = 30.0


class FrontendService:
    implementation = "openai-fastapi"

    def __init__(self, config: dict[str, Any], ipc_dir: str, max_model_len: int) -> None:
        cfg = PipelineConfig.from_dict(config)
        self.started = time.time()
        model = cfg.resolved_model()
        self.model_name = model or EMBEDDED_MODEL_NAME
        tokenizer = load_tokenizer(model)
        model_config = ModelConfig.from_pretrained(resolve_model_path(model))
        self.client = PipelineClient(
            tokenizer, model_config, max_model_len, PipelineAddresses(ipc_dir, cfg.addresses or {}), cfg.allow_remote
        )
        app = build_app(self.client, self.model_name, cfg.api_key, **cfg.frontend_limits())
        # NOTE: the plain asyncio loop, which pyzmq's asyncio sockets are known to work with.
        # A stop cuts open streams after 1 s: finishing them is a drain's job (Pipeline.drain, which
        # start_all runs on SIGTERM before it stops anything), not a stop's.
        uv_config = uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.frontend_port,
            log_level="warning",
            loop="asyncio",
            timeout_graceful_shutdown=1,
            timeout_keep_alive=KEEP_ALIVE_S,
        )
        self.server = uvicorn.Server(uv_config)
        self.url = f"http://{cfg.host}:{cfg.frontend_port}"
        self.thread = threading.Thread(target=self.server.run, name="frontend-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:  # Ready only once the port listens
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url} (port taken?)")
            time.sleep(0.02)
        # Outputs may come before any request does (for those of a frontend this one replaces): receive now.
        self.client.start(self.server.servers[0].get_loop())

    def drain(self) -> int:
        """Refuse new requests (503) from now on; return how many are still in flight."""
        self.client.draining = True
        return int(self.client.stats()["num_requests_in_flight"])

    def set_down(self, names: list[str]) -> None:
        """Which components are down now (the launcher's supervisor calls this): while any is,
        ``/health`` says "degraded" (503) and names them; an empty list clears it."""
        self.client.down_components = [str(name) for name in names]

    def resubmit(self) -> dict[str, int]:
        """Send every request in flight again, with its outputs so far (after a router or scheduler restart)."""
        return self.client.resubmit()

    def announce_events(self, token: str) -> None:
        """Publish ``Hello(token)``: tells a new subscriber that its subscription arrived."""
        self.client.events.announce(token)

    def health(self) -> dict[str, Any]:
        ok = self.thread.is_alive() and self.client.error is None and not self.client.draining
        return {
            "status": "ok" if ok else "error",
            "component": "frontend",
            "implementation": self.implementation,
            "model": self.model_name,
            "url": self.url,
            "uptime_s": round(time.time() - self.started, 3),
            **({} if ok else {"error": repr(self.client.error) if self.client.error else "uvicorn stopped"}),
        }

    def stats(self) -> dict[str, Any]:
        return self.client.stats()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.client.close()
