"""A device per worker (``PipelineConfig.devices``): checked at once, and each worker runs on its own.

On the CPU: two workers on ``devices=["cpu", "cpu"]`` write what the in-process ``LLM``
writes, and every bad value is a ``ConfigError`` naming ``devices``. On a machine with
CUDA, a GPU index it does not have is refused; with two GPUs, each worker sits on its own
card and sizes its KV cache from that card alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from modkit import LLM, Pipeline
from modkit.config import ConfigError, PipelineConfig
from modkit.frontend import EMBEDDED_MODEL_NAME
from modkit.sampling_params import SamplingParams

QUESTIONS = ["Hello!", "What does a dog say?", "What color is the sky?", "Who are you?"]


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"num_workers": 2, "devices": ["cpu"]}, "has 1 entries for num_workers=2"),
        ({"num_workers": 1, "devices": ["cpu", "cpu"]}, "has 2 entries for num_workers=1"),
        ({"num_workers": 2, "devices": ["cpu", "gpu:1"]}, "must be 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu:1'"),
        ({"num_workers": 1, "devices": ["cuda:x"]}, "got 'cuda:x'"),
        ({"num_workers": 1, "devices": [""]}, "must be a non-empty string"),
        ({"num_workers": 1, "devices": "cuda:0"}, "must be a list of devices"),
        ({"num_workers": 2, "devices": ["cpu", "cuda:0"]}, "mixes cpu and cuda"),
        ({"num_workers": 2, "devices": ["cpu", "cpu"], "device": "cpu"}, "are both set"),
    ],
)
def test_a_bad_devices_value_is_refused_naming_the_field(values: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match="devices") as caught:
        PipelineConfig(**values)
    assert caught.value.field == "devices" and says in str(caught.value), str(caught.value)


def test_devices_come_from_a_file_or_a_flag(tmp_path: Path) -> None:
    config = tmp_path / "pipeline.yaml"
    config.write_text("num_workers: 2\ndevices: [cuda:0, cuda:1]\n")
    assert PipelineConfig.from_file(config).devices == ["cuda:0", "cuda:1"]
    from_flags = PipelineConfig.from_cli(["--num-workers", "2", "--devices", "cpu, cpu"])
    assert from_flags.devices == ["cpu", "cpu"]
    assert [from_flags.to_engine_config(i).device for i in range(2)] == ["cpu", "cpu"]
    assert PipelineConfig(num_workers=2).to_engine_config(1).device is None  # no devices: today's default


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the indices are checked against its GPUs")
def test_the_workers_sharing_a_device_are_those_of_one_host_on_one_device() -> None:
    assert [PipelineConfig(num_workers=2).workers_sharing_device(i) for i in range(2)] == [2, 2]
    two_cards = PipelineConfig(num_workers=3, devices=["cuda:0", "cuda:1", "cuda"])  # "cuda" is cuda:0
    assert [two_cards.workers_sharing_device(i) for i in range(3)] == [2, 1, 2]
    elsewhere = PipelineConfig(
        num_workers=2,
        devices=["cuda:0", "cuda:0"],
        allow_remote=True,
        addresses={"worker-1.in": "tcp://10.0.0.7:9100"},  # worker-1's own host: its own cuda:0
    )
    assert [elsewhere.workers_sharing_device(i) for i in range(2)] == [1, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_this_machine_does_not_have_is_refused() -> None:
    count = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"names 'cuda:{count}', but this machine has {count} CUDA device"):
        PipelineConfig(num_workers=2, devices=["cuda:0", f"cuda:{count}"])


def asked(pipeline: Pipeline) -> list[str]:
    client = pipeline.client(timeout=120)
    replies = [
        client.chat.completions.create(
            model=pipeline.model_name, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=16
        )
        for q in QUESTIONS
    ]
    return [r.choices[0].message.content or "" for r in replies]


def engine_replies(model: str | None, device: str, **kwargs: Any) -> list[str]:
    """What the in-process engine writes for ``QUESTIONS``, greedily, one at a time as ``asked`` sends them."""
    llm = LLM(model, device=device, **kwargs)
    greedy = SamplingParams(temperature=0, max_tokens=16)
    return [llm.chat([[{"role": "user", "content": q}]], greedy, use_tqdm=False)[0].outputs[0].text for q in QUESTIONS]


def on_gpus(model: Path, devices: list[str]) -> Pipeline:
    """Two workers of the embedded model in float32 (greedy ties broken as on the CPU) on ``devices``."""
    return Pipeline.launch(
        model=str(model), dtype="float32", num_workers=2, devices=devices, ports="auto", progress=False
    )


def worker_info(pipeline: Pipeline, worker_id: int) -> dict[str, Any]:
    with pipeline.processes[f"worker-{worker_id}"].client(timeout_s=10.0) as rpc:
        info: dict[str, Any] = rpc.call("info")
    return info


@pytest.mark.slow
def test_two_workers_on_their_devices_write_what_the_engine_writes() -> None:
    with Pipeline.launch(num_workers=2, devices=["cpu", "cpu"], num_kv_blocks=64, ports="auto", progress=False) as p:
        assert p.model_name == EMBEDDED_MODEL_NAME
        served = asked(p)
        assert p.stats()["router"]["decisions"] == {"0": 2, "1": 2}  # round robin: both workers answered
        assert [worker_info(p, i)["device"] for i in range(2)] == ["cpu", "cpu"]
    assert served == engine_replies(None, "cpu", num_kv_blocks=64)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_each_worker_sits_on_its_own_gpu_and_sizes_its_cache_from_it(tiny_model_dir: Path) -> None:
    with on_gpus(tiny_model_dir, ["cuda:0", "cuda:1"]) as p:
        served = asked(p)
        infos = [worker_info(p, i) for i in range(2)]
    assert [info["device"] for info in infos] == ["cuda:0", "cuda:1"]
    assert all("shared by" not in info["memory"] for info in infos), infos  # each has a card to itself
    assert served == engine_replies(str(tiny_model_dir), "cuda:0", dtype="float32")


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_two_workers_on_one_gpu_share_its_memory(tiny_model_dir: Path) -> None:
    with on_gpus(tiny_model_dir, ["cuda:0", "cuda:0"]) as p:
        served = asked(p)
        infos = [worker_info(p, i) for i in range(2)]
    assert all("shared by 2 workers" in info["memory"] for info in infos), infos
    assert served == engine_replies(str(tiny_model_dir), "cuda:0", dtype="float32")
