"""``modkit.sim``: the real scheduler objects on a simulated clock, checked against themselves
and against a live pipeline.

The fast tests need no process: a simulation must show what the real ``Scheduler``,
``KVCacheManager`` and ``Router`` do (preemptions in a tiny pool, prefix hits on a shared
prefix, a policy's order), finish every request at its length, and give back the cost model
it ran with when one is fitted on its trace. The slow ones launch the embedded model on the
CPU, serve a Poisson workload live, and compare: ``Trace.summary`` with the numbers rebuilt
from the events, the replayed workload with the one sent, and the simulation of the same
workload and configuration with the live run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from modkit import loadgen, viz
from modkit.config import ConfigError
from modkit.model.config import ModelConfig
from modkit.sampling_params import SamplingParams
from modkit.sim import CostModel, Workload, WorkloadRequest, simulate
from modkit.sim.cost_model import FEATURES, step_features
from modkit.trace import Trace
from modkit.trace.events import StepEvent

# A made-up model of a CPU step: 3 ms a step, 0.2 ms a prompt token, 1 ms a decode.
COST = CostModel(
    [{"step": 3e-3, "num_prompt_tokens": 2e-4, "num_decode_tokens": 1e-3, "decode_context_tokens": 1e-6}],
    step_overhead_s=1e-3,
    idle_overhead_s=2e-3,
    admit_s=2e-3,
    output_s=5e-4,
    source="made up",
)


def poisson(n: int = 40, rate: float = 20.0, shared_prefix: int = 0, seed: int = 0) -> Workload:
    return Workload.poisson(n, rate, prompt_len=64, output_len=16, seed=seed, shared_prefix=shared_prefix)


# -- workloads -------------------------------------------------------------------------------


def test_poisson_workload_arrives_as_loadgen_sends_and_shares_its_prefix() -> None:
    workload = poisson(50, rate=4.0, shared_prefix=24, seed=3)
    assert [r.arrival_s for r in workload.requests] == loadgen.poisson_send_times(50, 4.0, seed=3)
    prompts = workload.prompts
    assert all(len(p) == 64 and p[:24] == prompts[0][:24] for p in prompts)
    assert len({tuple(p[24:]) for p in prompts}) == 50
    assert all(r.output_len == 16 and r.sampling_params.max_tokens == 16 for r in workload.requests)
    with pytest.raises(ValueError, match="shared_prefix"):
        Workload.poisson(2, 1.0, prompt_len=8, output_len=4, shared_prefix=9)


# -- the real scheduler objects ------------------------------------------------------------------


def test_every_request_finishes_at_its_length_in_an_ordinary_trace(tmp_path: Path) -> None:
    workload = poisson()
    trace = simulate(workload, COST)
    assert trace.meta["simulated"] is True and trace.meta["cost_model"]["source"] == "made up"
    requests = trace.requests
    assert len(requests) == len(workload)
    assert (requests.num_output_tokens == 16).all() and (requests.finish_reason == "length").all()
    assert (requests.arrival <= requests.first_scheduled).all()
    assert (requests.first_scheduled < requests.first_token).all() and (requests.first_token <= requests.finished).all()
    assert len(trace.forwards) == len(trace.steps) > 0
    assert trace.block_state(0).counts()["held"] == 0  # every block given back
    # Saved and loaded as any trace.
    assert Trace.load(trace.save(tmp_path / "sim.json.gz")).summary() == trace.summary()


def test_a_tiny_kv_pool_preempts_and_a_big_one_does_not() -> None:
    workload = poisson(rate=200.0)
    tiny = simulate(workload, COST, num_kv_blocks=14)  # 13 blocks: three prompts of 4, no room to grow
    big = simulate(workload, COST)
    assert tiny.summary().num_preemptions > 0 and big.summary().num_preemptions == 0
    assert tiny.summary().num_preemptions == int(tiny.requests.num_preemptions.sum())
    assert (tiny.requests.num_output_tokens == 16).all()  # preempted requests are recomputed and finish
    assert tiny.summary().ttft_p50_s > big.summary().ttft_p50_s


def test_a_shared_prefix_is_hit_unless_prefix_caching_is_off() -> None:
    shared = simulate(poisson(shared_prefix=48), COST)
    # After the first request, each finds its first three blocks (48 of 64 tokens) cached.
    assert shared.summary().prefix_hit_rate == pytest.approx(48 / 64 * (39 / 40), abs=0.01)
    assert simulate(poisson(shared_prefix=0), COST).summary().prefix_hit_rate == 0
    assert simulate(poisson(shared_prefix=48), COST, enable_prefix_caching=False).summary().prefix_hit_rate == 0


def test_sjf_admits_the_shortest_prompt_first_and_fcfs_the_first_arrival() -> None:
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    lengths = [50, 40, 30, 20, 10]
    workload = Workload([WorkloadRequest(0.001 * i, list(range(1, n + 1)), 4, params) for i, n in enumerate(lengths)])

    def order(policy: str) -> list[int]:
        requests = simulate(workload, COST, max_num_seqs=1, scheduling_policy=policy).requests
        return [int(r.removeprefix("sim-")) for r in requests.sort_values("first_scheduled").req_id]

    # The first arrives alone and runs; the rest queue behind it.
    assert order("fcfs") == [0, 1, 2, 3, 4]
    assert order("sjf") == [0, 4, 3, 2, 1]


def test_the_router_spreads_requests_over_workers() -> None:
    trace = simulate(poisson(), COST, num_workers=2, router_policy="round_robin")
    assert trace.routes.worker_id.tolist() == [i % 2 for i in range(40)]
    assert set(trace.steps.worker_id) == {0, 1}
    assert (trace.requests.num_output_tokens == 16).all()


def test_an_unknown_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="num_kv_blocks"):
        simulate(poisson(2), COST, num_kv_block=8)
    with pytest.raises(ConfigError, match="scheduling_policy"):
        simulate(poisson(2), COST, scheduling_policy="lifo")


def test_views_draw_a_simulated_trace() -> None:
    trace = simulate(poisson(rate=200.0), COST, num_kv_blocks=14)
    middle = float(trace.steps.start.median())
    viz.block_grid(trace, at=middle)
    viz.timeline(trace)
    assert len(viz.dashboard(trace).axes) >= len(viz.VIEWS)


# -- cost models ------------------------------------------------------------------------------


def varied_workload() -> Workload:
    """Prompts of many lengths, some longer than the budget below (chunked), so that no feature follows another."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    rng = np.random.default_rng(0)
    return Workload(
        [
            WorkloadRequest(0.02 * i, [int(t) for t in rng.integers(1, 999, size=n)], int(rng.integers(2, 30)), params)
            for i, n in enumerate(rng.integers(5, 200, size=60))
        ]
    )


def test_a_fit_on_a_simulated_trace_gives_back_its_cost_model() -> None:
    trace = simulate(varied_workload(), COST, max_num_batched_tokens=128)
    fitted = CostModel.fit(trace)
    steps = [e for e in trace.events if isinstance(e, StepEvent)]
    for step in steps:
        features = step_features(step.scheduled)
        assert fitted.forward_time(features) == pytest.approx(COST.forward_time(features), rel=1e-6)
    assert fitted.fit_error is not None and fitted.fit_error.p90 < 1e-6
    for name in ("step_overhead_s", "idle_overhead_s", "admit_s", "output_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(COST, name), rel=1e-6), name


def test_roofline_of_qwen_on_an_h100() -> None:
    qwen = ModelConfig.from_hf_dict(
        {
            "architectures": ["Qwen2ForCausalLM"],
            "vocab_size": 151936,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
        }
    )
    h100, h200 = CostModel.roofline(qwen, "H100"), CostModel.roofline(qwen, "H200")
    num_params = h100.info["num_params"]
    assert num_params == pytest.approx(494e6, rel=0.01)  # Qwen2.5-0.5B: 0.49 B parameters
    one_decode = step_features([_Scheduled(1, "decode", 256)])
    # One decode reads every weight (bf16) once: memory-bound, 2 bytes a parameter over 3.35 TB/s.
    assert h100.forward_time(one_decode) == pytest.approx(2 * num_params / 3.35e12, rel=0.05)
    assert h200.forward_time(one_decode) < h100.forward_time(one_decode)
    # A 2,048-token prompt chunk does 2 FLOPs a parameter a token: compute-bound at 989 TFLOP/s.
    prefill = step_features([_Scheduled(2048, "prompt", 0)])
    assert h100.forward_time(prefill) == pytest.approx(2 * num_params * 2048 / 989e12, rel=0.15)
    assert h200.forward_time(prefill) == pytest.approx(h100.forward_time(prefill), rel=0.05)
    with pytest.raises(ValueError, match="unknown gpu"):
        CostModel.roofline(qwen, "TPU")
    assert set(FEATURES) >= {k for term in h100.terms for k in term}


@dataclasses.dataclass
class _Scheduled:
    num_tokens: int
    kind: str
    num_computed_tokens: int
