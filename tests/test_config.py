"""PipelineConfig: documented defaults, one clear ConfigError per bad value, and four sources that agree."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from modkit.config import (
    CPU_PARALLEL_MIN_TOKENS,
    DEFAULT_GPU_MODEL,
    DTYPES,
    ConfigError,
    PipelineConfig,
    cpu_parallel_min_tokens,
    cpu_step_threads,
)
from modkit.engine.config import ConfigError as EngineConfigError
from modkit.engine.config import EngineConfig
from modkit.model import parse_dtype
from modkit.pipeline.processes import worker_threads_env
from modkit.transport import QUIET_THREADS

# A config far from the defaults, so a round trip that dropped a field would show.
CUSTOM: dict[str, Any] = {
    "model": "some/model",
    "dtype": "bfloat16",
    "device": "cpu",
    "max_model_len": 512,
    "gpu_memory_utilization": 0.5,
    "max_num_batched_tokens": 256,
    "max_num_seqs": 8,
    "block_size": 32,
    "num_kv_blocks": 64,
    "enable_prefix_caching": False,
    "enforce_eager": True,
    "scheduling_policy": "priority",
    "router_policy": "kv_aware",
    "attention_backend": "torch_ref",
    "seed": 7,
    "num_workers": 3,
    "cpu_parallel_min_tokens": 16,
    "host": "0.0.0.0",
    "allow_remote": True,
    "api_key": "sk-test",
    "frontend_port": 9001,
    "sampler_port": 9006,
    "log_dir": "logs",
}


def test_defaults_match_the_design() -> None:
    config = PipelineConfig()
    assert config.ports() == {
        "frontend": 8001,
        "scheduler": 8002,
        "worker-0": 8003,
        "router": 8004,
        "kv_cache_manager": 8005,
        "sampler": 8006,
    }
    assert (config.gpu_memory_utilization, config.max_num_batched_tokens, config.max_num_seqs) == (0.9, 2048, 256)
    assert (config.block_size, config.num_workers, config.host, config.allow_remote) == (16, 1, "127.0.0.1", False)
    assert (config.scheduling_policy, config.router_policy, config.sampler) == ("fcfs", "round_robin", "default")
    assert config.attention_backend == "auto" and config.enable_prefix_caching
    assert config.urls()["router"] == "http://127.0.0.1:8004/health"


def test_config_error_is_the_engines() -> None:
    assert ConfigError is EngineConfigError and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("model", ""),
        ("model", 3),
        ("dtype", "fp64"),
        ("device", "tpu"),
        ("device", "cuda:x"),
        ("device", "cpu:0"),
        ("device", "cuda:"),
        ("max_model_len", 1),
        ("max_model_len", "512"),
        ("gpu_memory_utilization", 0),
        ("gpu_memory_utilization", 1.5),
        ("gpu_memory_utilization", -0.1),
        ("gpu_memory_utilization", float("nan")),
        ("gpu_memory_utilization", True),
        ("gpu_memory_utilization", "0.9"),
        ("max_num_batched_tokens", 0),
        ("max_num_batched_tokens", 2048.0),
        ("max_num_seqs", 0),
        ("max_num_seqs", True),
        ("block_size", 0),
        ("block_size", "16"),
        ("block_size", None),
        ("num_kv_blocks", 1),
        ("enable_prefix_caching", "yes"),
        ("enable_prefix_caching", 1),
        ("scheduling_policy", "lifo"),
        ("router_policy", "random"),
        ("router_policy", None),
        ("sampler", "greedy"),
        ("attention_backend", "flash"),
        ("seed", -1),
        ("seed", 1.0),
        ("num_workers", 0),
        ("num_workers", True),
        ("host", "0.0.0.0"),
        ("host", "10.0.0.5"),
        ("host", "example.com"),
        ("host", ""),
        ("host", 127),
        ("allow_remote", "true"),
        ("api_key", ""),
        ("api_key", "<redacted>"),
        ("frontend_port", 0),
        ("scheduler_port", 65536),
        ("worker_port", "8003"),
        ("router_port", 8001),  # frontend's
        ("sampler_port", 8005),  # kv_cache_manager's
        ("log_dir", ""),
    ],
)
def test_every_bad_value_names_its_field_and_value(name: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        PipelineConfig(**{name: value})
    assert info.value.field == name
    assert str(info.value).startswith(f"{name} ") and repr(value) in str(info.value)


def test_a_quoted_number_is_not_an_integer() -> None:
    with pytest.raises(ConfigError, match=r"block_size must be an integer >= 1, got '16', a string"):
        PipelineConfig.from_dict({"block_size": "16"})


def test_choices_suggest_the_nearest() -> None:
    with pytest.raises(ConfigError, match=r"one of 'kv_aware', 'least_loaded', 'round_robin'.*did you mean 'kv_aware'"):
        PipelineConfig(router_policy="kv-aware")


def test_workers_must_fit_below_port_65536() -> None:
    with pytest.raises(ConfigError, match="num_workers is 2, so the workers need ports up to 65536") as info:
        PipelineConfig(worker_port=65535, num_workers=2)
    assert info.value.field == "num_workers"


def test_unknown_keys_get_a_suggestion_from_every_source(tmp_path: Path) -> None:
    file = tmp_path / "pipeline.yaml"
    file.write_text("blok_size: 8\n")
    attempts = [
        lambda: PipelineConfig(blok_size=8),  # type: ignore[call-arg]
        lambda: PipelineConfig.from_dict({"blok_size": 8}),
        lambda: PipelineConfig.from_file(file),
        lambda: PipelineConfig.from_cli(["--config", str(file)]),
    ]
    for attempt in attempts:
        with pytest.raises(ConfigError, match=r"blok_size is not a PipelineConfig field.*did you mean 'block_size'\?"):
            attempt()
    with pytest.raises(ConfigError, match=r"--blok-size is not a flag.*did you mean --block-size\?") as info:
        PipelineConfig.from_cli(["--blok-size", "8"])
    assert info.value.field == "--blok-size"


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_files_round_trip(tmp_path: Path, suffix: str) -> None:
    config = PipelineConfig(**CUSTOM)
    file = tmp_path / f"pipeline{suffix}"
    values = config.to_dict(include_secrets=True)
    file.write_text(json.dumps(values) if suffix == ".json" else yaml.safe_dump(values))
    assert PipelineConfig.from_file(file) == config
    assert PipelineConfig.from_file(str(file)) == config


def test_an_empty_yaml_file_means_every_default(tmp_path: Path) -> None:
    file = tmp_path / "empty.yaml"
    file.write_text("# nothing set\n")
    assert PipelineConfig.from_file(file) == PipelineConfig()


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("bad.yaml", "block_size: [16\n", "does not parse as YAML"),
        ("bad.json", '{"block_size": 16,}', "does not parse as JSON"),
        ("list.yaml", "- 1\n- 2\n", "must hold a mapping of fields, got list"),
        ("pipeline.toml", "block_size = 16\n", "must end in .yaml, .yml or .json"),
    ],
)
def test_bad_files_are_named(tmp_path: Path, name: str, text: str, match: str) -> None:
    file = tmp_path / name
    file.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        PipelineConfig.from_file(file)
    assert info.value.field == "config" and str(file) in str(info.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read") as info:
        PipelineConfig.from_file(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(info.value)


def test_a_bad_value_in_a_file_names_field_and_file(tmp_path: Path) -> None:
    file = tmp_path / "pipeline.yaml"
    file.write_text('block_size: "16"\n')
    with pytest.raises(ConfigError, match=r"block_size must be an integer .* \(in .*pipeline.yaml\)") as info:
        PipelineConfig.from_file(file)
    assert info.value.field == "block_size"


def test_cli_flags_parse() -> None:
    config = PipelineConfig.from_cli(
        [
            "--model", "some/model",
            "--max-model-len", "512",
            "--gpu-memory-utilization", "0.5",
            "--block-size", "32",
            "--no-enable-prefix-caching",
            "--router-policy", "least_loaded",
            "--num-workers", "2",
            "--host", "::1",
            "--frontend-port=9001",
        ]
    )  # fmt: skip
    expected = PipelineConfig(
        model="some/model",
        max_model_len=512,
        gpu_memory_utilization=0.5,
        block_size=32,
        enable_prefix_caching=False,
        router_policy="least_loaded",
        num_workers=2,
        host="::1",
        frontend_port=9001,
    )
    assert config == expected
    assert config.urls()["worker-1"] == "http://[::1]:8007/health"
    assert PipelineConfig.from_cli([]) == PipelineConfig()


def test_cli_flags_override_the_file(tmp_path: Path) -> None:
    file = tmp_path / "pipeline.yaml"
    file.write_text(yaml.safe_dump({"block_size": 32, "max_model_len": 512, "host": "0.0.0.0", "seed": 3}))
    # The file alone is invalid (0.0.0.0 without allow_remote): values are checked once, after merging.
    config = PipelineConfig.from_cli(["--config", str(file), "--block-size", "8", "--max-model-len", "none",
                                      "--allow-remote"])  # fmt: skip
    assert (config.block_size, config.max_model_len, config.host, config.seed) == (8, None, "0.0.0.0", 3)
    assert config.allow_remote


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--block-size", "abc"], "block_size"),
        (["--gpu-memory-utilization", "most"], "gpu_memory_utilization"),
        (["--block-size", "0"], "block_size"),
        (["--block-size"], "command line"),
        (["8"], "command line"),
        (["--host", "0.0.0.0"], "host"),
    ],
)
def test_bad_cli_values_raise_config_error(argv: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        PipelineConfig.from_cli(argv)
    assert info.value.field == field


def test_worker_ports_skip_component_ports() -> None:
    assert PipelineConfig(num_workers=3).worker_ports() == [8003, 8007, 8008]
    moved = PipelineConfig(num_workers=4, worker_port=8100, sampler_port=8101, router_port=8103)
    assert moved.worker_ports() == [8100, 8102, 8104, 8105]
    names = list(PipelineConfig(num_workers=3).urls())
    assert names == ["frontend", "scheduler", "worker-0", "worker-1", "worker-2", "router", "kv_cache_manager",
                     "sampler"]  # fmt: skip


def test_to_engine_config_maps_fields() -> None:
    config = PipelineConfig(**CUSTOM)
    engine = config.to_engine_config(2)
    assert isinstance(engine, EngineConfig)
    for name in ("model", "dtype", "device", "max_model_len", "max_num_batched_tokens", "max_num_seqs", "block_size",
                 "num_kv_blocks", "enable_prefix_caching", "scheduling_policy", "sampler", "attention_backend",
                 "enforce_eager", "seed"):  # fmt: skip
        assert getattr(engine, name) == getattr(config, name), name
    assert engine.gpu_memory_utilization == 0.5
    assert PipelineConfig(device="cpu").to_engine_config().model is None  # the embedded model
    for index in (3, -1, True):
        with pytest.raises(ConfigError, match="worker_index must be an integer in"):
            config.to_engine_config(index)


def test_host_beyond_loopback_needs_allow_remote() -> None:
    with pytest.raises(ConfigError, match=r"host is '0\.0\.0\.0', which is not loopback.*allow_remote=True"):
        PipelineConfig(host="0.0.0.0")
    assert PipelineConfig(host="0.0.0.0", allow_remote=True).urls()["frontend"] == "http://127.0.0.1:8001/health"
    assert PipelineConfig(host="example.com", allow_remote=True).urls()["sampler"] == "http://example.com:8006/health"
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert PipelineConfig(host=host).host == host


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only choice")
def test_resolved_model_is_the_embedded_model_without_a_gpu() -> None:
    assert PipelineConfig().resolved_model() is None


def test_resolved_model_follows_model_and_device() -> None:
    assert PipelineConfig(model="my/model").resolved_model() == "my/model"
    assert PipelineConfig(device="cpu").resolved_model() is None
    assert PipelineConfig(device="cuda:1").resolved_model() == DEFAULT_GPU_MODEL


def test_frozen_and_replace_validates_again() -> None:
    config = PipelineConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.block_size = 8  # type: ignore[misc]
    assert dataclasses.replace(config, block_size=8).block_size == 8
    with pytest.raises(ConfigError, match="block_size"):
        dataclasses.replace(config, block_size=0)


def test_api_key_stays_out_of_logs() -> None:
    config = PipelineConfig(api_key="sk-secret")
    assert "sk-secret" not in repr(config)
    assert config.to_dict()["api_key"] == "<redacted>"
    assert config.to_dict(include_secrets=True)["api_key"] == "sk-secret"
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    assert PipelineConfig().to_dict()["api_key"] is None


def test_dtype_names_are_the_loaders() -> None:
    for name in DTYPES:
        parse_dtype(name)


def test_a_cpu_worker_of_two_threads_runs_small_steps_on_one() -> None:
    """Small steps gain nothing from a second thread woken for them (the NOTE by
    CPU_PARALLEL_MIN_TOKENS); on more threads, where that was not measured, every step uses all."""
    assert cpu_parallel_min_tokens(None, 2) == cpu_parallel_min_tokens(None, 1) == CPU_PARALLEL_MIN_TOKENS
    assert cpu_parallel_min_tokens(None, 4) == 1
    assert cpu_parallel_min_tokens(16, 2) == cpu_parallel_min_tokens(16, 8) == 16  # as set
    assert [cpu_step_threads(n, 2, 64) for n in (1, 63, 64, 2048)] == [1, 1, 2, 2]
    assert [cpu_step_threads(n, 8, 1) for n in (1, 64)] == [8, 8]
    assert PipelineConfig().worker_parallel_min_tokens(2) == CPU_PARALLEL_MIN_TOKENS
    assert PipelineConfig(tensor_parallel_size=2).worker_parallel_min_tokens(2) == 1  # its ranks keep theirs alike
    for bad in (0, -1, 1.5, "64", True):
        with pytest.raises(ConfigError, match="cpu_parallel_min_tokens"):
            PipelineConfig(cpu_parallel_min_tokens=bad)


def test_cpu_workers_share_the_cores_and_gpu_workers_keep_one_host_thread() -> None:
    cores = len(os.sched_getaffinity(0))
    one = worker_threads_env(PipelineConfig(device="cpu"))
    assert one["OMP_NUM_THREADS"] == str(cores), "one CPU worker takes every usable core"
    assert one["OMP_WAIT_POLICY"] == "PASSIVE", "its threads sleep while it waits for the other processes"
    four = worker_threads_env(PipelineConfig(device="cpu", num_workers=4))
    assert four["OMP_NUM_THREADS"] == str(max(1, cores // 4))
    assert four["OMP_WAIT_POLICY"] == "PASSIVE", "a waiting thread sleeps instead of taking a core from another worker"
    assert worker_threads_env(PipelineConfig(device="cuda", num_workers=2)) == QUIET_THREADS
