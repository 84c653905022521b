"""Serve the OpenAI API with the six-process pipeline until Ctrl-C or SIGTERM.

    python scripts/start_all.py                                  # the embedded model, CPU
    python scripts/start_all.py --num-workers 2 --router-policy kv_aware
    python scripts/start_all.py --model Qwen/Qwen2.5-0.5B-Instruct --config pipeline.yaml

Flags are ``PipelineConfig``'s (``--help``). It starts every component, waits until each
``/health`` answers 200, prints the URLs, and serves; on Ctrl-C or SIGTERM it stops every
process and frees every port, then exits 0. A bad flag exits 2 with the field named.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from modkit import Pipeline
from modkit.config import ConfigError, PipelineConfig


def main(argv: list[str] | None = None) -> int:
    try:
        config = PipelineConfig.from_cli(argv)
    except ConfigError as error:
        print(f"start_all: {error}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        pipeline = Pipeline.launch(config)
    except ConfigError as error:
        print(f"start_all: {error}", file=sys.stderr)
        return 2
    with pipeline:
        print(f"OpenAI API: {pipeline.url}/v1  (model {pipeline.model_name!r})")
        for name, url in pipeline.urls().items():
            print(f"  {name:<17} {url}")
        print("serving; Ctrl-C or SIGTERM stops every component", flush=True)
        while not stop.wait(1.0):
            pass
        print("stopping ...", flush=True)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
