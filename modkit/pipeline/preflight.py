"""Checks that run before a pipeline starts anything: the model's length limit, free ports."""

from __future__ import annotations

import socket

from modkit.config import ConfigError, PipelineConfig
from modkit.model import resolve_model_path
from modkit.model.config import ModelConfig


def resolve_max_model_len(config: PipelineConfig) -> int:
    """``max_model_len``, or the model's own limit; ConfigError if it is beyond the model's."""
    model_config = ModelConfig.from_pretrained(resolve_model_path(config.resolved_model()))
    limit = model_config.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > limit:
        raise ConfigError(
            "max_model_len", f"must be <= the model's max_position_embeddings ({limit}), got {config.max_model_len}"
        )
    return config.max_model_len or limit


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
