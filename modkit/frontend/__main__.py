"""Serve the OpenAI API with the engine in this process.

    python -m modkit.frontend                                   # the embedded model, port 8001
    python -m modkit.frontend --model Qwen/Qwen2.5-0.5B-Instruct --api-key secret
    python -m modkit.frontend --config pipeline.yaml --frontend-port 9001
    python -m modkit.frontend --ipc-dir DIR [flags]    # the pipeline's frontend, run by hand
    python -m modkit.frontend --config pipeline.yaml --keys DIR   # ... with the launch's keys

Flags are ``PipelineConfig``'s (``python -m modkit.frontend --help``). The six-process
pipeline puts the same app in front of the router and scheduler processes; this
single-process form is the simplest way to talk to the engine over HTTP.
"""

from __future__ import annotations

import sys

import uvicorn

from modkit.config import ConfigError, PipelineConfig
from modkit.engine.async_engine import AsyncEngine
from modkit.frontend import EMBEDDED_MODEL_NAME
from modkit.frontend.app import KEEP_ALIVE_S, build_app


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("--ipc-dir", "--keys") or a.startswith(("--ipc-dir=", "--keys=")) for a in args):
        from modkit.pipeline.standalone import run_component

        run_component("frontend", args)
        return
    try:
        config = PipelineConfig.from_cli(args)
    except ConfigError as err:
        sys.exit(f"modkit.frontend: {err}")
    engine = AsyncEngine(config.to_engine_config())
    name = config.resolved_model() or EMBEDDED_MODEL_NAME
    try:
        app = build_app(engine, name, config.api_key, **config.frontend_limits())
        uvicorn.run(
            app, host=config.host, port=config.frontend_port, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S
        )
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
