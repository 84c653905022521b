"""Run one pipeline component in the foreground, without the launcher.

    python -m modkit.worker --worker-id 1 --port 8007 [config flags]
    python -m modkit.scheduler --num-workers 2
    python -m modkit.frontend --ipc-dir /tmp/modkit-1000     # the pipeline's frontend needs the flag

    # on several hosts: the same config file and keys directory on each (docs/scaling.md)
    python -m modkit keys keys/                               # once; copy keys/ to every host
    python -m modkit.worker --config pipeline.yaml --keys keys/ --worker-id 0 [--port N]

Every component of one pipeline must get the same config (flags or ``--config FILE``)
and the same ``--ipc-dir`` (where the socket files live; by default
``/tmp/modkit-<uid>``) for the sockets the config's ``addresses`` do not put on TCP.
``--port`` overrides the component's HTTP port from the config. Each serves ``GET
/health`` and ``GET /stats`` there, on the config's ``host``, and stops on Ctrl-C or
SIGTERM.

``--keys DIR`` (written by ``python -m modkit keys DIR``) makes this process a member of
the launch those keys name, as ``Pipeline.launch``'s children are: its control calls are
signed and checked, and every ``tcp://`` socket speaks CURVE (``modkit.transport.security``).
Without it, a ``tcp://`` address beyond loopback in ``addresses`` is refused at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from types import FrameType
from typing import Any

from modkit.config import ConfigError, PipelineConfig
from modkit.pipeline.addresses import PipelineAddresses, worker_name
from modkit.transport import RpcClient, RpcServer, security
from modkit.transport.addresses import is_loopback, split_tcp
from modkit.transport.keyfiles import KeyFileError, load_keys
from modkit.transport.serve import HealthHTTPServer, serve


def default_ipc_dir() -> str:
    """One directory per user, so components started by hand find each other with no flag."""
    return os.path.join(tempfile.gettempdir(), f"modkit-{os.getuid()}")


def remote_tcp_addresses(config: PipelineConfig) -> dict[str, str]:
    """The sockets ``addresses`` puts on a ``tcp://`` endpoint beyond loopback (these need keys)."""
    return {
        name: endpoint
        for name, endpoint in (config.addresses or {}).items()
        if endpoint.startswith("tcp://") and not is_loopback(split_tcp(endpoint)[0])
    }


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_component(kind: str, argv: list[str] | None = None) -> None:
    """Parse the command line, build the ``kind`` component's service and serve it until stopped."""
    parser = argparse.ArgumentParser(prog=f"python -m modkit.{kind}", add_help=False)
    parser.add_argument(
        "--ipc-dir",
        default=default_ipc_dir(),
        help="directory of the pipeline's socket files, the same for every component (default: %(default)s)",
    )
    parser.add_argument("--port", type=int, default=None, help="HTTP port for /health and /stats")
    parser.add_argument("--keys", metavar="DIR", default=None, help="the launch's keys (python -m modkit keys DIR)")
    if kind == "worker":
        parser.add_argument("--worker-id", type=int, required=True)
    own, rest = parser.parse_known_args(argv)
    try:
        config = PipelineConfig.from_cli(rest)
        keys = load_keys(own.keys) if own.keys is not None else None
    except (ConfigError, KeyFileError) as error:
        sys.exit(f"modkit.{kind}: {error}")
    if keys is None and (remote := remote_tcp_addresses(config)):
        name, endpoint = next(iter(remote.items()))
        sys.exit(
            f"modkit.{kind}: addresses[{name!r}] is {endpoint}, beyond loopback: such a socket speaks CURVE "
            "with the launch's keys, and there are none; make them once with 'python -m modkit keys DIR', "
            "copy DIR to every host and pass --keys DIR"
        )
    security.set_process_keys(keys)  # every socket this process opens signs, checks, and speaks CURVE with them
    logging.basicConfig(level="INFO", format=f"%(asctime)s {kind}[%(process)d] %(levelname)s %(name)s: %(message)s")
    addresses = PipelineAddresses.at(own.ipc_dir, config.addresses)
    name = worker_name(own.worker_id) if kind == "worker" else kind
    if own.port is not None:
        config = (
            PipelineConfig.from_dict({**config.to_dict(include_secrets=True), f"{kind}_port": own.port})
            if kind != "worker"
            else config
        )
    port = own.port if own.port is not None else config.ports().get(name)
    if port is None:
        sys.exit(f"modkit.{kind}: {name} is not one of the {config.num_workers} workers; give --port or --num-workers")
    build = _builders()[kind]
    signal.signal(signal.SIGTERM, _stop)
    with contextlib.ExitStack() as stack:
        stack.callback(security.stop_authenticators)  # CURVE's ZAP threads, once every socket is closed
        obj = build(config, addresses, own)
        close = getattr(obj, "close", None)
        if callable(close):
            stack.callback(close)
        server = stack.enter_context(RpcServer(obj, addresses.rpc(name), allow_remote=config.allow_remote))
        if kind != "frontend":  # the frontend's app answers /health itself
            http = HealthHTTPServer(config.host, port, server.address, name, api_key=config.api_key)
            stack.callback(http.close)
        print(f"{name} serving: http://{config.host}:{port}/health", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            serve(obj, server)


def _builders() -> dict[str, Callable[[PipelineConfig, PipelineAddresses, argparse.Namespace], object]]:
    from modkit.pipeline.preflight import resolve_max_model_len

    def common(config: PipelineConfig, addresses: PipelineAddresses) -> dict[str, Any]:
        return {"config": config.to_dict(include_secrets=True), "ipc_dir": addresses.ipc_dir}

    def worker(c: PipelineConfig, a: PipelineAddresses, own: argparse.Namespace) -> object:
        from modkit.worker.service import WorkerService

        return WorkerService(**common(c, a), worker_id=own.worker_id, max_model_len=resolve_max_model_len(c))

    def scheduler(c: PipelineConfig, a: PipelineAddresses, own: argparse.Namespace) -> object:
        from modkit.scheduler.service import SchedulerService

        return SchedulerService(**common(c, a), max_model_len=resolve_max_model_len(c))

    def router(c: PipelineConfig, a: PipelineAddresses, own: argparse.Namespace) -> object:
        from modkit.router.service import RouterService

        return RouterService(**common(c, a))

    def sampler(c: PipelineConfig, a: PipelineAddresses, own: argparse.Namespace) -> object:
        from modkit.sampler.service import SamplerService

        return SamplerService(**common(c, a))

    def kv_cache_manager(c: PipelineConfig, a: PipelineAddresses, own: argparse.Namespace) -> object:
        from modkit.kvcache.service import KVCacheService

        num_blocks = []  # each pool is sized from its worker's KV cache: ask them (they may still be loading)
        for i in range(c.num_workers):
            with RpcClient(a.rpc(worker_name(i)), timeout_s=600.0) as rpc:
                num_blocks.append(int(rpc.call("info")["num_blocks"]))
        return KVCacheService(
            num_blocks, c.block_size, c.enable_prefix_caching, a.kv_events, c.allow_remote, c.eviction_policy
        )

    def frontend(c: PipelineConfig, a: PipelineAddresses, own: argparse.Namespace) -> object:
        from modkit.frontend.service import FrontendService

        return FrontendService(**common(c, a), max_model_len=resolve_max_model_len(c))

    return {
        "frontend": frontend,
        "worker": worker,
        "scheduler": scheduler,
        "router": router,
        "sampler": sampler,
        "kv_cache_manager": kv_cache_manager,
    }
