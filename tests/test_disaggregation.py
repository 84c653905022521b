"""Disaggregated prefill and decode: prompts on a prefill worker, their KV blocks moved to a
decode worker that generates, the same greedy tokens as the in-process ``LLM``.

One launch serves chunked prompts, prefix hits on the decode side and preemptions (a small
KV pool); a second injects failed transfers through a connector that keeps no blocks, and
keeps short prompts local (conditional disaggregation); the first ends by killing its
prefill worker while requests are in flight.
"""

from __future__ import annotations

import io
import json
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from matplotlib.collections import LineCollection
from waiting import wait_until

from modkit import LLM, Pipeline, viz
from modkit.config import ConfigError, PipelineConfig
from modkit.kvcache import KVCacheManager
from modkit.kvtransfer import SchedulerConnector
from modkit.protocol import AddRequest
from modkit.request import Request
from modkit.sampling_params import SamplingParams
from modkit.scheduler import Scheduler
from modkit.scheduler.disaggregation import SchedulerDisaggregation
from modkit.scheduler.slots import WorkerSlot
from modkit.trace import Trace
from modkit.transport.rundirs import launcher_alive, shared_memory_parent, sweep_stale_dirs

ROOT = Path(__file__).resolve().parent.parent
BLOCK_SIZE = 4
SMALL = {"num_kv_blocks": 40, "block_size": BLOCK_SIZE, "max_num_batched_tokens": 16, "max_num_seqs": 8}
SMALL |= {"kv_transfer_timeout_s": 1.0}  # a read from a dead prefill worker gives up soon
STORY = "Once upon a time there was a little girl who lived in a village near the forest. "
PROMPTS = [STORY + "One day", STORY + "Every morning she", "The dog ran", STORY * 2 + "Then"]
MAX_TOKENS = 24


def expected(prompts: list[str], max_tokens: int = MAX_TOKENS, **engine: str) -> list[str]:
    llm = LLM(num_kv_blocks=256, block_size=BLOCK_SIZE, **engine)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]


def complete(pipeline: Pipeline, prompts: list[str], max_tokens: int = MAX_TOKENS) -> tuple[list[str], list[str]]:
    """The prompts at once (one stream each); their texts and request ids."""
    client = pipeline.client(timeout=120.0)  # a hang fails the test, not the suite

    def one(prompt: str) -> tuple[str, str]:
        reply = client.completions.create(
            model=pipeline.model_name,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return reply.choices[0].text, reply.id

    with ThreadPoolExecutor(len(prompts)) as pool:
        done = list(pool.map(one, prompts))
    return [text for text, _ in done], [req_id for _, req_id in done]


# -- configuration: refused at once ------------------------------------------------------------


def test_roles_are_checked_when_the_config_is_built() -> None:
    with pytest.raises(ConfigError, match="decode_workers"):
        PipelineConfig(prefill_workers=1)
    with pytest.raises(ConfigError, match="prefill_workers"):
        PipelineConfig(decode_workers=2)
    with pytest.raises(ConfigError, match="num_workers"):
        PipelineConfig(prefill_workers=1, decode_workers=1, num_workers=3)
    with pytest.raises(ConfigError, match="max_prefill_queue_size"):
        PipelineConfig(prefill_workers=1, decode_workers=1, max_prefill_queue_size=0)
    with pytest.raises(ConfigError, match="max_local_prefill_length"):
        PipelineConfig(prefill_workers=1, decode_workers=1, max_local_prefill_length=-1)
    with pytest.raises(ConfigError, match="kv_transfer_timeout_s"):
        PipelineConfig(prefill_workers=1, decode_workers=1, kv_transfer_timeout_s=0)
    with pytest.raises(ConfigError, match="decode_workers"):
        Pipeline.launch(prefill_workers=2, progress=False)
    with pytest.raises(ConfigError, match="kv_connector"):
        PipelineConfig(prefill_workers=1, decode_workers=1, kv_connector="nccl")  # no such connector here
    with pytest.raises(ConfigError, match="tensor_parallel"):
        PipelineConfig(prefill_workers=1, decode_workers=1, tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="'cuda_ipc' needs every worker on CUDA, but worker-0 is on cpu"):
        PipelineConfig(prefill_workers=1, decode_workers=1, kv_connector="cuda_ipc", device="cpu")
    elsewhere = {"worker-1.in": "tcp://10.0.0.7:9100"}  # a handle to GPU memory means nothing on another host
    for one_host in ("shm", "cuda_ipc"):
        with pytest.raises(ConfigError, match=r"one host, but the workers run on \['10.0.0.7', 'local'\]"):
            PipelineConfig(prefill_workers=1, decode_workers=1, kv_connector=one_host, addresses=elsewhere)
    PipelineConfig(prefill_workers=1, decode_workers=1, kv_connector="shm", device="cpu")
    with pytest.raises(ConfigError, match="'shm' is for workers on the CPU, but worker-0 is on cuda"):
        PipelineConfig(prefill_workers=1, decode_workers=1, kv_connector="shm", device="cuda")
    config = PipelineConfig.from_cli(["--prefill-workers", "1", "--decode-workers", "2"])  # start_all.py's flags
    assert config.num_workers == 3
    assert [config.worker_role(i) for i in range(3)] == ["prefill", "decode", "decode"]
    assert PipelineConfig(num_workers=2).worker_role(1) == "both"


# -- the scheduler side, in process --------------------------------------------------------------


def test_decode_admission_loads_only_the_blocks_past_its_prefix_hit() -> None:
    """vLLM's get_num_new_matched_tokens: all of the prompt but its last token, less the local hit."""
    kv = KVCacheManager(num_blocks=32, block_size=BLOCK_SIZE)
    scheduler = Scheduler(kv, max_num_batched_tokens=64, max_num_seqs=4, max_model_len=128)
    scheduler.connector = connector = SchedulerConnector("decode", BLOCK_SIZE)
    params = SamplingParams(temperature=0, max_tokens=4)
    cached = Request("a", list(range(1, 10)), params, ())
    scheduler.add_request(cached)
    scheduler.schedule()
    kv.cache_blocks(cached, cached.num_computed_tokens)  # tokens 1..8: two full blocks cached
    prompt = list(range(1, 19))  # 18 tokens: 2 blocks cached, 17 - 8 = 9 to load, the last computed
    connector.add_remote("b", src_worker_id=0, num_tokens=len(prompt))
    scheduler.add_request(Request("b", prompt, params, ()))
    plan = scheduler.schedule()
    assert plan.num_scheduled_tokens["b"] == 1
    load = plan.kv_connector_metadata.reqs_to_load["b"]
    assert (load.src_worker_id, load.first_block, load.num_blocks) == (0, 2, 3)  # tokens 8..16: blocks 2..4
    assert scheduler.requests["b"].num_computed_tokens == len(prompt)
    assert "b" not in connector.remote  # used once: a preempted request computes its prompt itself
    scheduler.check_invariants()


class Roles(SchedulerDisaggregation):
    """The scheduler process's disaggregation logic over real in-process Schedulers (no sockets)."""

    def __init__(self, roles: list[str], max_local_prefill_length: int, max_prefill_queue_size: int) -> None:
        self.block_size = BLOCK_SIZE
        self.slots = []
        for i in range(len(roles)):
            kv = KVCacheManager(num_blocks=32, block_size=BLOCK_SIZE)
            scheduler = Scheduler(kv, max_num_batched_tokens=64, max_num_seqs=4, max_model_len=128)
            self.slots.append(WorkerSlot(i, scheduler, kv, None))  # type: ignore[arg-type]
        self._setup_roles(roles, max_local_prefill_length, max_prefill_queue_size)

    def _decode_worker_of(self, req_id: str) -> int:
        return 1  # where() routes every request to worker 1

    def where(self, req_id: str, num_tokens: int, num_cached_blocks: int = 0) -> int:
        """Which worker computes a new prompt of ``num_tokens`` routed to worker 1 (and queue it there)."""
        prompt = list(range(1, num_tokens + 1))
        params = SamplingParams(temperature=0, max_tokens=4)
        message = AddRequest(req_id, prompt, params, (), 0.0, worker_id=1, num_cached_blocks=num_cached_blocks)
        request = Request(req_id, prompt, params, ())
        prefill = self._prefill_slot(message, request, self.slots[1])
        if prefill is None:
            self.slots[1].scheduler.add_request(request)
            return 1
        self._start_prefill(prefill, request)
        return prefill.worker_id


def test_conditional_disaggregation_follows_both_thresholds() -> None:
    """Dynamo's rule: remote only when the uncached prompt is long and the prefill queue short."""
    roles = Roles(["prefill", "decode"], max_local_prefill_length=8, max_prefill_queue_size=2)
    assert roles.where("short", 8) == 1  # not longer than the threshold: computed where it generates
    assert roles.where("long", 9) == 0
    assert roles.where("cached", 12, num_cached_blocks=1) == 1  # 12 - 4 cached = 8 uncached: local
    assert roles.where("long-2", 12) == 0
    assert roles.where("queue-full", 40) == 1  # two prompts wait on the prefill worker already
    assert (roles.num_remote_prefills, roles.num_local_prefills) == (2, 3)
    roles.slots[0].scheduler.schedule()  # the prefill worker admits its two: its queue is empty again
    assert roles.where("long-3", 40) == 0
    roles.slots[0].alive = False
    assert roles.where("prefill-dead", 40) == 1  # no live prefill worker: never lost, computed locally
    aggregated = Roles(["both", "both"], max_local_prefill_length=0, max_prefill_queue_size=8)
    assert aggregated.where("any", 40) == 1 and not aggregated.disaggregated


def test_a_prompt_on_a_prefill_worker_is_aborted_there_or_handed_back() -> None:
    """An abort reaches the prefill worker's copy; a prefill worker lost hands its prompts to the
    decode worker, or back to the router when that one is gone too. Nothing is dropped."""
    roles = Roles(["prefill", "decode"], max_local_prefill_length=0, max_prefill_queue_size=8)
    assert [roles.where(r, 20) for r in ("aborted", "lost", "orphan")] == [0, 0, 0]
    roles._abort_prefill("aborted")
    assert "aborted" not in roles.slots[0].scheduler.requests and "aborted" not in roles.prefilling
    assert "aborted" not in roles._connector(roles.slots[0]).to_save
    prefill = roles.slots[0].scheduler
    prefill.take_requests(list(prefill.requests))  # as when the prefill worker is found dead
    assert roles._prefill_lost(["lost"]) == []  # the decode worker computes it
    assert "lost" in roles.slots[1].scheduler.requests
    roles.slots[1].alive = False
    orphans = roles._prefill_lost(["orphan", "never-there"])
    assert [r.req_id for r in orphans] == ["orphan"]  # to be routed again
    assert roles.num_prefills_lost == 2 and not roles.prefilling
    for slot in roles.slots:
        slot.scheduler.check_invariants()


# -- the pipeline --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def disaggregated() -> Iterator[Pipeline]:
    # Every prompt goes to the prefill worker, however many wait there (the queue threshold has its own test).
    config = SMALL | {"max_prefill_queue_size": 64}
    with Pipeline.launch(prefill_workers=1, decode_workers=1, ports="auto", progress=False, **config) as p:
        yield p


@pytest.mark.slow
def test_disaggregated_outputs_equal_the_in_process_engine(disaggregated: Pipeline) -> None:
    p = disaggregated
    first, _ = complete(p, PROMPTS[:1])  # alone: the decode worker then caches the story's blocks
    rest, req_ids = complete(p, PROMPTS[1:] * 3)  # together: chunked prompts, preemptions in a pool of 40
    want = expected(PROMPTS)
    assert first == want[:1]
    assert rest == want[1:] * 3
    trace = p.trace()
    transfers, scheduled = trace.transfers, trace.scheduled
    # Every prompt moved (threshold 0; a queue of 64): the repeated prompts are 3 tokens past a block
    # boundary, so a prefix hit on the decode worker never covers all of one but its last token.
    assert set(req_ids) <= set(transfers.req_id)
    assert transfers.failed.isna().all()
    assert (transfers.num_bytes > 0).all() and (transfers.end >= transfers.start).all()
    block_bytes = transfers.num_bytes / transfers.num_blocks
    assert block_bytes.nunique() == 1  # every block is the same size: K and V of every layer
    # The decode worker already cached the story: later requests that share it read only the rest.
    assert (transfers.first_block > 0).any()
    # Preempted on the decode side, where requests hold blocks for long (a prefill worker's copies
    # finish after one token and, under a budget of 16 tokens a step, never run out of blocks).
    assert 1 in set(scheduled[scheduled.kind == "preempted"].worker_id)
    prompts = scheduled[scheduled.kind == "prompt"]
    assert (prompts[prompts.worker_id == 0].num_cached_tokens > 0).any()  # a prefix hit on the prefill side
    assert set(trace.steps.worker_id) == {0, 1}
    prefill_tokens = scheduled[(scheduled.worker_id == 0) & (scheduled.kind == "prompt")].num_tokens.sum()
    decode_prompt = scheduled[(scheduled.worker_id == 1) & (scheduled.kind == "prompt")]
    assert prefill_tokens > decode_prompt.num_tokens.sum()  # the prompts ran on worker 0
    stats = p.stats()["scheduler"]
    assert stats["num_remote_prefills"] >= len(PROMPTS) and stats["num_local_prefills"] == 0
    assert_handoffs_drawn(trace, failed=False)
    assert stats["workers"][0]["num_requests_running"] == stats["workers"][1]["num_requests_running"] == 0
    assert p.stats()["worker-0"]["kv_transfer"] == {"num_requests_kept": 0}  # every copy was read, and let go


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("connector", ["zmq", "cuda_ipc"])
def test_on_a_gpu_each_connector_gives_the_in_process_engines_outputs(connector: str, tiny_model_dir: Path) -> None:
    """Both workers on one GPU: blocks through host memory (zmq) or mapped GPU to GPU (cuda_ipc)."""
    gpu = {"model": str(tiny_model_dir), "device": "cuda", "dtype": "float32"}
    config = SMALL | gpu | {"max_prefill_queue_size": 64, "kv_connector": connector}
    with Pipeline.launch(prefill_workers=1, decode_workers=1, ports="auto", progress=False, **config) as p:
        first, _ = complete(p, PROMPTS[:1])
        rest, req_ids = complete(p, PROMPTS[1:] * 3)
        trace = p.trace()
        nothing_held = {"num_requests_kept": 0} | ({"num_requests_lent": 0} if connector != "zmq" else {})
        held = lambda: p.stats()["worker-0"]["kv_transfer"]  # noqa: E731
        assert wait_until(lambda: held() == nothing_held, 10), held()  # releases are one-way
    want = expected(PROMPTS, **gpu)
    assert first == want[:1] and rest == want[1:] * 3
    transfers = trace.transfers
    assert set(req_ids) <= set(transfers.req_id) and transfers.failed.isna().all()
    assert (transfers.first_block > 0).any()  # a prefix the decode worker cached is not moved again
    assert (transfers.num_bytes / transfers.num_blocks).nunique() == 1


@pytest.mark.slow
def test_the_shared_memory_connector_gives_the_same_outputs_and_leaves_no_file() -> None:
    """kv_connector="shm": each prompt's blocks in a file that both workers map; the decode worker
    reads past its cached prefix in place (a strided view), each file goes once it is copied, and
    the directory of a killed worker goes at the next launch's sweep."""
    config = SMALL | {"max_prefill_queue_size": 64, "kv_connector": "shm"}
    with Pipeline.launch(prefill_workers=1, decode_workers=1, ports="auto", progress=False, **config) as p:
        first, _ = complete(p, PROMPTS[:1])
        rest, req_ids = complete(p, PROMPTS[1:] * 3)
        trace = p.trace()
        nothing_held = {"num_requests_kept": 0, "num_requests_lent": 0}
        assert wait_until(lambda: p.stats()["worker-0"]["kv_transfer"] == nothing_held, 10)  # releases are one-way
        directory = kv_directory(p.pids()["worker-0"])
        assert directory.is_dir() and not list(directory.glob("*.kv"))  # every file released, and removed
        os.kill(p.pids()["worker-0"], signal.SIGKILL)  # a killed worker cannot remove its directory:
        assert wait_until(lambda: not launcher_alive(directory), 10)
        assert directory in sweep_stale_dirs()  # the next launch's sweep does
    want = expected(PROMPTS)
    assert first == want[:1] and rest == want[1:] * 3
    transfers = trace.transfers
    assert set(req_ids) <= set(transfers.req_id) and transfers.failed.isna().all()
    assert (transfers.first_block > 0).any()
    assert (transfers.num_bytes / transfers.num_blocks).nunique() == 1


def kv_directory(pid: int) -> Path:
    """The shm connector's directory that worker process ``pid`` owns (its owner file names it)."""
    for directory in shared_memory_parent().glob("modkit-kv-*"):
        owner = directory / "launcher.json"
        if owner.is_file() and json.loads(owner.read_text())["pid"] == pid:
            return directory
    raise AssertionError(f"no modkit-kv-* directory of pid {pid} in {shared_memory_parent()}")


@pytest.mark.slow
def test_a_prefill_worker_killed_mid_run_loses_no_request(disaggregated: Pipeline) -> None:
    """Its queued prompts go back to the decode worker; reads of blocks it kept fail and are computed."""
    p = disaggregated
    prompts = [f"Story {i}: " + STORY * 2 for i in range(10)]  # no shared prefix: each needs 3+ prefill steps
    p.clear_trace()
    with ThreadPoolExecutor(1) as pool:
        steps = p.stats()["scheduler"]["workers"][0]["num_steps"]
        running = pool.submit(complete, p, prompts, 16)
        assert wait_until(lambda: p.stats()["scheduler"]["workers"][0]["num_steps"] > steps + 1, 30)
        os.kill(p.pids()["worker-0"], signal.SIGKILL)
        texts, _ = running.result(timeout=120)
    assert texts == expected(prompts, 16)
    assert p.stats()["scheduler"]["num_prefills_lost"] > 0


@pytest.mark.slow
def test_preemptions_on_the_prefill_side_change_no_output() -> None:
    """Four long prompts queued at once on a prefill worker with 40 blocks and a budget of 64
    tokens: it preempts some (their copies recompute), and every reply is still the engine's."""
    prompts = [f"Tale {i}: " + STORY * 4 for i in range(4)]  # ~80 tokens each: 20 blocks of 4
    config = SMALL | {"max_num_batched_tokens": 64}
    with Pipeline.launch(prefill_workers=1, decode_workers=1, ports="auto", progress=False, **config) as p:
        p.hold_requests(True)  # all four in the prefill worker's queue before its first step
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(complete, p, prompts, 16)
            assert wait_until(lambda: p.hold_requests(True) == len(prompts), 30)
            p.hold_requests(False)
            texts, req_ids = running.result(timeout=120)
        trace = p.trace()
    assert texts == expected(prompts, 16)
    scheduled = trace.scheduled
    assert 0 in set(scheduled[scheduled.kind == "preempted"].worker_id)
    assert set(trace.transfers.req_id) == set(req_ids) and trace.transfers.failed.isna().all()


@pytest.mark.slow
def test_failed_transfers_are_computed_on_the_decode_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill worker that keeps nothing (tests/disagg_targets.py): each read fails, the decode
    worker computes the prompt; short prompts never leave it (max_local_prefill_length)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])))
    # The two long prompts share no prefix: whichever runs first, the other is not cached (and local).
    short, long, other = "The dog ran", STORY + "One day", "Every morning, " + STORY
    with Pipeline.launch(
        prefill_workers=1,
        decode_workers=1,
        ports="auto",
        progress=False,
        kv_connector="disagg_targets:ForgetfulConnector",
        max_local_prefill_length=8,
        **SMALL,
    ) as p:
        texts, req_ids = complete(p, [long, short, other])
        trace = p.trace()
        stats = p.stats()["scheduler"]
    assert texts == expected([long, short, other])
    transfers = trace.transfers
    assert req_ids[1] not in set(transfers.req_id)  # 3 tokens: computed where it generates
    assert {req_ids[0], req_ids[2]} <= set(transfers.req_id)
    assert transfers.failed.str.contains("does not hold").all() and (transfers.num_bytes == 0).all()
    assert stats["num_local_prefills"] >= 1 and stats["num_remote_prefills"] == 2
    assert_handoffs_drawn(trace, failed=True)


def assert_handoffs_drawn(trace: Trace, failed: bool) -> None:
    """viz.handoffs draws each transfer as an arrow from worker 0's lane down to worker 1's."""
    figure = viz.handoffs(trace, max_requests=100)
    ax = figure.axes[0]
    arrows = {a.get_gid(): a for a in ax.collections if isinstance(a, LineCollection)}
    drawn = arrows["failed" if failed else "transfer"].get_segments()
    assert len(drawn) == len(trace.transfers) and len(arrows["transfer" if failed else "failed"].get_segments()) == 0
    assert all(start[1] < 0.5 < end[1] for start, end in drawn)  # lane 0 (prefill) to lane 1 (decode)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["worker 0\n(prefill)", "worker 1\n(decode)"]
    figure.savefig(io.BytesIO(), format="png")
