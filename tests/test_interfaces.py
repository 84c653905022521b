"""Each component's real implementations satisfy the interface its ``interface.py`` declares.

Two checks, because each misses what the other sees: ``isinstance`` against the
runtime-checkable protocols (plus the parameter names of every method, which ``isinstance``
does not look at) on real objects, and mypy on ``_implementations_satisfy`` below, which
assigns each implementation class to its interface and so checks every signature.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from modkit.attention.interface import AttentionBackend, get_attention_backend
from modkit.kvcache import KVCacheManager
from modkit.model import load_model
from modkit.router import KVAware, LeastLoaded, RoundRobin, Router
from modkit.router.interface import RouterInterface, RouterPolicyInterface
from modkit.sampler.interface import Sampler, get_sampler
from modkit.scheduler import Scheduler
from modkit.scheduler.interface import PlansAhead, SchedulerInterface
from modkit.worker import ModelRunner, PagedKVCache, Worker
from modkit.worker.interface import WorkerInterface

if TYPE_CHECKING:
    from modkit.engine.async_engine import AsyncEngine
    from modkit.frontend.interface import EngineClient
    from modkit.frontend.pipeline_client import PipelineClient
    from modkit.kvcache.client import KVCacheManagerClient
    from modkit.kvcache.interface import KVCacheManagerInterface
    from modkit.vllm_v1.kv_cache_manager import VLLMKVCacheManager
    from modkit.vllm_v1.sampler import VLLMSampler
    from modkit.vllm_v1.scheduler import VLLMScheduler

REPO = Path(__file__).resolve().parents[1]


def _implementations_satisfy(
    scheduler: Scheduler,
    vllm_scheduler: VLLMScheduler,
    worker: Worker,
    router: Router,
    policies: tuple[RoundRobin, LeastLoaded, KVAware],
    kv: tuple[KVCacheManager, KVCacheManagerClient, VLLMKVCacheManager],
    samplers: tuple[VLLMSampler],
    engines: tuple[AsyncEngine, PipelineClient],
) -> None:
    """Never called: mypy (``test_mypy_agrees``) checks that every assignment type-checks."""
    schedulers: list[SchedulerInterface] = [scheduler, vllm_scheduler]
    plans_ahead: PlansAhead = scheduler
    workers: list[WorkerInterface] = [worker]
    routers: list[RouterInterface] = [router]
    router_policies: list[RouterPolicyInterface] = list(policies)
    kv_managers: list[KVCacheManagerInterface] = list(kv)
    sampler_list: list[Sampler] = list(samplers)
    engine_clients: list[EngineClient] = list(engines)
    del schedulers, plans_ahead, workers, routers, router_policies, kv_managers, sampler_list, engine_clients


def assert_satisfies(obj: object, interface: type) -> None:
    """``isinstance``, and every method of ``interface`` takes the same parameters, by name, on ``obj``."""
    assert isinstance(obj, interface), f"{type(obj).__name__} is not a {interface.__name__}"
    for name, member in vars(interface).items():
        if name.startswith("_") or not inspect.isfunction(member):
            continue
        declared = list(inspect.signature(member).parameters)[1:]  # without self
        implemented = list(inspect.signature(getattr(obj, name)).parameters)
        assert implemented[: len(declared)] == declared, f"{type(obj).__name__}.{name}{implemented} != {declared}"


def test_schedulers_satisfy_the_scheduler_interface() -> None:
    scheduler = Scheduler(KVCacheManager(16, 4), 32, 8, 128)
    assert_satisfies(scheduler, SchedulerInterface)
    assert_satisfies(scheduler, PlansAhead)


def test_vllm_scheduler_satisfies_the_scheduler_interface() -> None:
    pytest.importorskip("vllm", reason="vllm is not installed: pip install -e .[vllm]")
    from modkit.vllm_v1.scheduler import VLLMScheduler

    scheduler = VLLMScheduler(16, 4, 32, 8, 128)
    assert_satisfies(scheduler, SchedulerInterface)
    # vLLM's scheduler, as wrapped, is stepped in turn: the engine must not plan ahead with it.
    assert not isinstance(scheduler, PlansAhead)


def test_worker_satisfies_the_worker_interface(random_checkpoint: Callable[[str], Path]) -> None:
    model = load_model(random_checkpoint("qwen2"))
    worker = Worker(ModelRunner(model, PagedKVCache.allocate(model.config, 8, 16, torch.float32, "cpu")))
    assert_satisfies(worker, WorkerInterface)


def test_router_and_its_policies_satisfy_the_router_interfaces() -> None:
    router = Router(2, 4, "kv_aware")
    assert_satisfies(router, RouterInterface)
    for policy in (RoundRobin(), LeastLoaded(), KVAware()):
        assert_satisfies(policy, RouterPolicyInterface)


def test_registered_samplers_and_attention_backends_implement_their_interfaces() -> None:
    # Both interfaces are ABCs with a registry: what a name gives back must be one.
    assert isinstance(get_sampler("default"), Sampler)
    for name in ("torch_ref", "torch_batched"):
        assert isinstance(get_attention_backend(name), AttentionBackend)


@pytest.mark.slow
def test_mypy_agrees() -> None:
    """The static half: mypy checks this file, so ``_implementations_satisfy`` must type-check."""
    api = pytest.importorskip("mypy.api")
    stdout, stderr, status = api.run(
        [str(Path(__file__)), "--config-file", str(REPO / "pyproject.toml"), "--python-executable", sys.executable]
    )
    assert status == 0, stdout + stderr
