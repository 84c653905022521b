"""Checks that run before a pipeline starts anything: the model's length limit and
``tensor_parallel_size``, free ports, and the ports themselves when a launch asks for
``ports="auto"`` or a first port."""

from __future__ import annotations

import dataclasses
import logging
import random
import socket

from modkit.config import ConfigError, PipelineConfig
from modkit.engine.config import fit_max_model_len
from modkit.model import resolve_model_path
from modkit.model.config import ModelConfig
from modkit.worker.tensor_parallel import check_tensor_parallel

log = logging.getLogger(__name__)


def resolve_max_model_len(config: PipelineConfig) -> int:
    """``max_model_len``, or the model's own limit; ConfigError if it is beyond the model's.

    With ``num_kv_blocks`` given, every worker's KV pool is known before anything starts: a
    length the pool cannot hold is refused if the user set it, or lowered to what the pool
    holds (and logged) if it was the model's default (``fit_max_model_len``). So every
    component starts with the same, final value. A pool sized from free memory is checked
    once the workers report it (``Pipeline._start_all``).
    """
    model_config = ModelConfig.from_pretrained(resolve_model_path(config.resolved_model()))
    check_tensor_parallel(config.tensor_parallel_size, model_config, config.device)
    limit = model_config.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > limit:
        raise ConfigError(
            "max_model_len", f"must be <= the model's max_position_embeddings ({limit}), got {config.max_model_len}"
        )
    max_model_len = config.max_model_len or limit
    if config.num_kv_blocks is not None:
        return fit_to_kv_pool(config, max_model_len, config.num_kv_blocks)
    return max_model_len


def fit_to_kv_pool(config: PipelineConfig, max_model_len: int, num_blocks: int) -> int:
    """``max_model_len`` within a worker's pool of ``num_blocks`` (``fit_max_model_len``), logged if lowered."""
    sized_by = "num_kv_blocks" if config.num_kv_blocks is not None else "gpu_memory_utilization"
    explicit = config.max_model_len is not None
    fitted = fit_max_model_len(max_model_len, explicit, num_blocks, config.block_size, sized_by)
    if fitted < max_model_len:
        log.warning(
            "max_model_len lowered from the model's %d to %d: a worker's KV cache holds no more "
            "(%d blocks of %d); a larger cache (num_kv_blocks) allows longer requests",
            max_model_len,
            fitted,
            num_blocks - 1,
            config.block_size,
        )
    return fitted


class PortInUseError(OSError):
    """A component's HTTP port is taken, most often by a pipeline launched earlier and still running."""


def check_ports_free(config: PipelineConfig) -> None:
    """PortInUseError naming the first component whose port something already listens on."""
    for name, port in config.ports().items():
        with socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
            try:
                probe.bind((config.host, port))
            except OSError as error:
                field = "worker_port" if name.startswith("worker") else f"{name}_port"
                raise PortInUseError(
                    f"port {port} of {name} is in use ({error.strerror}): is a pipeline already running? "
                    f"Shut it down, or pick other ports ({field}=...)"
                ) from None


# Where ports="auto" looks for a free run of ports: above the registered range most services
# use, below the ephemeral range (32768 on) from which the OS hands out client ports.
AUTO_PORT_RANGE = (20000, 32000)
AUTO_PORT_TRIES = 200


def with_ports(config: PipelineConfig, ports: int | str | None) -> PipelineConfig:
    """``config`` with its ports laid out from ``ports``, which is a launch's ``ports=`` argument
    or ``MODKIT_PORTS``: None keeps the config's own ports (8001-8006 by default); a first port
    N (an int or digits) gives frontend N, scheduler N+1, worker-0 N+2, router N+3, KV cache
    manager N+4, sampler N+5 and further workers N+6 on, the same order as 8001-8006;
    ``"auto"`` finds such a run of ports that is free now, so that pipelines, notebooks and
    tests on one machine never collide. ConfigError("ports") for anything else."""
    if ports is None:
        return config
    if isinstance(ports, str) and ports.strip().lower() == "auto":
        return _free_run(config)
    if isinstance(ports, str) and ports.strip().isdigit():
        ports = int(ports)
    if isinstance(ports, bool) or not isinstance(ports, int):
        raise ConfigError("ports", f"must be 'auto' or a first port such as 9001, got {ports!r}")
    return _laid_out(config, ports)


def _laid_out(config: PipelineConfig, first: int) -> PipelineConfig:
    span = 5 + config.num_workers  # six components, and the workers after the first
    if not 1024 <= first <= 65536 - span:
        raise ConfigError(
            "ports", f"first port {first} leaves no room: {span} ports from it must lie within 1024..65535"
        )
    return dataclasses.replace(
        config,
        frontend_port=first,
        scheduler_port=first + 1,
        worker_port=first + 2,
        router_port=first + 3,
        kv_cache_manager_port=first + 4,
        sampler_port=first + 5,
    )


def _free_run(config: PipelineConfig) -> PipelineConfig:
    low, high = AUTO_PORT_RANGE
    pick = random.Random()  # not the global generator: a notebook may have seeded it
    for _ in range(AUTO_PORT_TRIES):
        candidate = _laid_out(config, pick.randrange(low, high))
        try:
            check_ports_free(candidate)
        except PortInUseError:
            continue
        return candidate
    raise PortInUseError(f"no run of {5 + config.num_workers} free ports found in {low}..{high}; pass ports=N")
