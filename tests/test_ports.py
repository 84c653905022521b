"""``ports=``: the seed's 8001-8006 by default, a layout from a first port, or a free run of ports,
so that notebooks, ``start_all.py`` and the test suite run side by side on one machine."""

from __future__ import annotations

import socket

import pytest

from modkit import Pipeline
from modkit.config import ConfigError, PipelineConfig
from modkit.frontend import EMBEDDED_MODEL_NAME
from modkit.pipeline.preflight import PortInUseError, check_ports_free, with_ports


def test_no_ports_keeps_the_seeds_layout() -> None:
    config = with_ports(PipelineConfig(num_workers=2), None)
    assert config.ports() == {
        "frontend": 8001,
        "scheduler": 8002,
        "worker-0": 8003,
        "worker-1": 8007,
        "router": 8004,
        "kv_cache_manager": 8005,
        "sampler": 8006,
    }


@pytest.mark.parametrize("first", [9001, "9001", " 9001 "])
def test_a_first_port_lays_every_component_out_in_the_seeds_order(first: int | str) -> None:
    config = with_ports(PipelineConfig(num_workers=3), first)
    assert config.ports() == {
        "frontend": 9001,
        "scheduler": 9002,
        "worker-0": 9003,
        "worker-1": 9007,
        "worker-2": 9008,
        "router": 9004,
        "kv_cache_manager": 9005,
        "sampler": 9006,
    }


def test_auto_takes_a_free_run_of_ports() -> None:
    config = with_ports(PipelineConfig(num_workers=2), "auto")
    ports = sorted(config.ports().values())
    assert ports == list(range(ports[0], ports[0] + 7)), "the seed's layout, from another first port"
    check_ports_free(config)  # all free when chosen
    # Taken ports are never chosen: hold one run open, and the next choice avoids it.
    with socket.socket() as held:
        held.bind(("127.0.0.1", config.frontend_port))
        held.listen()
        again = with_ports(PipelineConfig(num_workers=2), "AUTO")
        assert config.frontend_port not in again.ports().values()
        with pytest.raises(PortInUseError, match=f"port {config.frontend_port} of frontend"):
            check_ports_free(config)


@pytest.mark.parametrize("bad", ["any", "", "80", 70000, 65534, True, 9001.0, ["auto"]])
def test_a_bad_ports_value_is_a_named_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"^ports "):
        with_ports(PipelineConfig(), bad)  # type: ignore[arg-type]


@pytest.mark.slow
def test_two_pipelines_on_auto_ports_serve_side_by_side() -> None:
    """Two notebooks at once, or a notebook beside start_all.py: neither takes the other's ports."""
    with (
        Pipeline.launch(ports="auto", num_kv_blocks=32, progress=False) as first,
        Pipeline.launch(ports="auto", num_kv_blocks=32, progress=False) as second,
    ):
        assert not set(first.config.ports().values()) & set(second.config.ports().values())
        for p in (first, second):
            reply = p.client(timeout=60).completions.create(
                model=EMBEDDED_MODEL_NAME, prompt="Hello", max_tokens=4, temperature=0
            )
            assert reply.usage is not None and reply.usage.completion_tokens == 4
            assert all(h["status"] == "ok" for h in p.health().values())
