"""Serve the OpenAI API with the six-process pipeline until Ctrl-C or SIGTERM.

    python scripts/start_all.py                                  # the embedded model, CPU
    python scripts/start_all.py --num-workers 2 --router-policy kv_aware
    python scripts/start_all.py --model Qwen/Qwen2.5-0.5B-Instruct --config pipeline.yaml
    python scripts/start_all.py --save-trace run.json.gz         # then: Trace.load("run.json.gz")
    python scripts/start_all.py --ports 9001                     # 9001..9006 instead of 8001..8006

Flags are ``PipelineConfig``'s (``--help``); ``--save-trace PATH``: record the event
stream while serving and save it as a trace (``modkit.trace.Trace``) when stopping;
``--ports N`` or ``--ports auto``: every port laid out from N, or from a free run of ports,
as ``Pipeline.launch(ports=...)`` does (the default keeps 8001-8006). It
starts every component, waits until each ``/health`` answers 200, prints the URLs, and
serves. While it serves, the supervisor restarts a component that dies (``--no-supervise``
turns that off; ``--max-restarts``, ``--restart-window-s``, ``--restart-backoff-s`` bound
it) and each change is printed: "degraded: frontend restarting" while a part is down (the
API does not answer while the frontend is), "serving again" once all are back. A log
directory it makes (``--log-dir``) is mode 0700. On Ctrl-C or SIGTERM it drains:
new requests get 503 while those in flight finish (30 s at most; a second signal cuts
that short); then it stops every process, frees every port and exits 0. A bad flag exits 2
with the field named.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from modkit import Pipeline
from modkit.config import ConfigError, PipelineConfig
from modkit.pipeline.preflight import PortInUseError

DRAIN_TIMEOUT_S = 30.0
STATUS_INTERVAL_S = 0.5


def describe(down: dict[str, str]) -> str:
    """The status line for what is down now (``Pipeline.down()``)."""
    if not down:
        return "serving again: every component is back"
    parts = ", ".join(f"{name} {state}" for name, state in sorted(down.items()))
    gone = " (the API does not answer)" if "frontend" in down else ""
    return f"degraded: {parts}{gone}"


def main(argv: list[str] | None = None) -> int:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--save-trace", metavar="PATH", default=None)
    own.add_argument("--ports", metavar="N|auto", default=None)
    options, rest = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        config = PipelineConfig.from_cli(rest)
    except ConfigError as error:
        print(f"start_all: {error}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # a second signal: stop draining
        stop.set()

    signal.signal(signal.SIGTERM, interrupt)  # while starting, SIGTERM stops what started, as Ctrl-C does
    try:
        pipeline = Pipeline.launch(config, ports=options.ports, record=options.save_trace is not None)
    except (ConfigError, PortInUseError) as error:
        print(f"start_all: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("start_all: interrupted while starting; stopped what had started", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with pipeline:
        print(f"OpenAI API: {pipeline.url}/v1  (model {pipeline.model_name!r})")
        for name, url in pipeline.urls().items():
            print(f"  {name:<17} {url}")
        print("serving; Ctrl-C or SIGTERM drains, then stops every component", flush=True)
        down: dict[str, str] = {}
        while not stop.wait(STATUS_INTERVAL_S):
            if (now := pipeline.down()) != down:
                print(describe(now), flush=True)
                down = now
        print(f"draining (at most {DRAIN_TIMEOUT_S:g} s; signal again to stop now) ...", flush=True)
        try:
            drained = pipeline.drain(DRAIN_TIMEOUT_S)
        except KeyboardInterrupt:
            drained = False
        if options.save_trace is not None:
            trace = pipeline.trace()
            print(f"saved {trace} to {trace.save(options.save_trace)}", flush=True)
        print("stopping ..." if drained else "stopping with requests in flight ...", flush=True)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
