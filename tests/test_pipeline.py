"""The six-process pipeline as a whole: health of every port, a worker killed, restarts,
clean shutdown, and the KV cache manager behind ZeroMQ making the in-process decisions.

The OpenAI surface (chat, streaming, errors, 32 concurrent streams equal to ``LLM``)
is tested against the pipeline in ``test_server.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from pipeline_targets import POISON_TOKEN
from waiting import pid_exists, wait_until

from modkit import LLM, Pipeline
from modkit.config import ConfigError, PipelineConfig, free_component_ports
from modkit.frontend import EMBEDDED_MODEL_NAME
from modkit.kvcache import KVCacheManager
from modkit.kvcache.client import KVCacheManagerClient
from modkit.kvcache.interface import KVCacheManagerInterface, KVRequest
from modkit.kvcache.service import KVCacheService
from modkit.pipeline.addresses import socket_names
from modkit.pipeline.preflight import PortInUseError, with_ports
from modkit.protocol import KVAdmit, KVCacheComputed
from modkit.request import Request
from modkit.sampling_params import SamplingParams
from modkit.scheduler import ModelRunnerOutput, Scheduler, SchedulerOutput
from modkit.trace import Trace
from modkit.trace.events import BlockEvents, PipelineEvent
from modkit.transport import ComponentProcess, Subscriber, free_tcp_port, free_tcp_ports, ipc_address

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ["frontend", "scheduler", "worker-0", "worker-1", "router", "kv_cache_manager", "sampler"]


def distinct_free_ports(n: int, taken: set[int] | None = None) -> list[int]:
    """``n`` ports free now, all different and none of ``taken``."""
    taken = taken or set()
    return [port for port in free_tcp_ports(n + len(taken)) if port not in taken][:n]


def free_ports() -> dict[str, int]:
    return free_component_ports()


def port_is_free(port: int) -> bool:
    """Nothing listens on it: a server could bind it now (a closed connection's TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_for(check: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def hello(client: openai.OpenAI) -> str:
    reply = client.chat.completions.create(
        model=EMBEDDED_MODEL_NAME,
        messages=[{"role": "user", "content": "Hello!"}],
        temperature=0,
        max_tokens=12,
    )
    return reply.choices[0].message.content or ""


# -- the KV cache manager in its own process decides exactly as in-process --------------------


@pytest.mark.slow
@pytest.mark.parametrize("plan_ahead", [False, True], ids=["in-turn", "async-scheduling"])
def test_remote_kv_cache_manager_gives_the_scheduler_the_same_decisions(plan_ahead: bool) -> None:
    """Same trace, two transports: every SchedulerOutput (block ids included) is equal, with
    prefix hits, chunked prompts and preemptions (a cache too small for all requests); also
    with async scheduling, two steps in flight as the pipeline keeps them."""
    num_blocks, block_size = 24, 4
    service = ComponentProcess.start(
        "kv-test",
        "modkit.kvcache.service:KVCacheService",
        {"num_blocks": [num_blocks], "block_size": block_size},
        ipc_address("kv-test.rpc"),
    )
    try:
        with service.client(timeout_s=10) as rpc:
            local = Scheduler(KVCacheManager(num_blocks, block_size), 32, 8, 64)
            remote_kv = KVCacheManagerClient(rpc, 0, block_size)
            remote = Scheduler(remote_kv, 32, 8, 64)
            shared = list(range(1, 13))
            for i in range(8):
                prompt = shared + [20 + i] * (3 + 2 * i) if i % 2 == 0 else [40 + i] * (5 + i)
                for s in (local, remote):
                    s.add_request(Request(f"r{i}", list(prompt), SamplingParams(temperature=0, max_tokens=12)))
            steps = planned_ahead = 0
            in_flight: list[tuple[SchedulerOutput, SchedulerOutput, list[str]]] = []
            while local.has_unfinished_requests() or in_flight:
                while local.has_unfinished_requests() and (
                    not in_flight or (plan_ahead and len(in_flight) == 1 and local.can_plan_ahead())
                ):
                    planned_ahead += bool(in_flight)
                    a, b = local.schedule(), remote.schedule()
                    assert a == b, f"step {steps}: the schedules differ"
                    # A request samples once every known token is computed (a prompt chunk mid-prompt
                    # does not); its token is a placeholder until the step comes back.
                    sampled = [
                        r
                        for r in a.num_scheduled_tokens
                        if (q := local.requests[r]).num_computed_tokens == q.num_tokens + q.num_output_placeholders - 1
                    ]
                    in_flight.append((a, b, sampled))
                a, b, sampled = in_flight.pop(0)
                tokens = [(steps * 7 + k) % 50 + 60 for k in range(len(sampled))]
                for s, out in ((local, a), (remote, b)):
                    s.update_from_output(out, ModelRunnerOutput(sampled, tokens))
                local.check_invariants()
                remote.check_invariants()  # also: its block tables are exactly the service's
                steps += 1
                assert steps < 500
            assert not remote.has_unfinished_requests()
            assert (planned_ahead > 0) == plan_ahead
            assert local.num_preemptions > 0, "the trace should preempt"
            assert remote_kv.num_promised > 0, "decodes that cross a block boundary are promised, then batched"
            stats = rpc.call("stats")
            pool = stats["pools"][0]
            assert pool["prefix_cache_hits"] == local.kv.stats().prefix_cache_hits > 0  # type: ignore[attr-defined]
            assert pool["kv_blocks_free"] == num_blocks - 1
            assert stats["num_calls"] < stats["num_ops"], "calls that return nothing travel together"
    finally:
        service.stop()


def admit_in_order(kv: KVCacheManagerInterface, requests: list[KVRequest], token_budget: int) -> list[tuple[int, int]]:
    """The scheduler's admission calls (``Scheduler._schedule_waiting``): for each request in turn,
    its prefix-cache hit, then blocks for what the budget allows; stop at the first that does not fit.
    Returns (tokens hit, tokens to compute) for each admitted request."""
    kv.prepare_admissions(requests, token_budget)
    admitted = []
    for request in requests:
        if token_budget == 0:
            break
        hit_blocks, num_hit = kv.get_computed_blocks(request)
        num_new = min(request.num_tokens - num_hit, token_budget)
        if kv.allocate_slots(request, num_new, hit_blocks, num_hit) is None:
            break
        request.num_computed_tokens = num_hit
        admitted.append((num_hit, num_new))
        token_budget -= num_new
    kv.flush()
    return admitted


def admit(kv: KVCacheManagerInterface, request: KVRequest, token_budget: int) -> tuple[int, int] | None:
    admitted = admit_in_order(kv, [request], token_budget)
    return admitted[0] if admitted else None


@pytest.mark.slow
def test_a_run_of_admissions_is_one_round_trip_to_the_kv_cache_manager() -> None:
    """Each prefix-cache lookup and first allocation travel together, a whole run of them in one
    round trip, and give what the in-process manager gives."""
    pool = {"num_blocks": [8], "block_size": 4}  # 7 blocks to hand out
    service = ComponentProcess.start("kv-admit", "modkit.kvcache.service:KVCacheService", pool, ipc_address("kv-a.rpc"))
    try:
        with service.client(timeout_s=10) as rpc:
            remote, local = KVCacheManagerClient(rpc, 0, 4), KVCacheManager(8, 4)
            params = SamplingParams(max_tokens=4)
            first = [Request("a", list(range(1, 11)), params), Request("a", list(range(1, 11)), params)]
            for kv, request in zip((remote, local), first, strict=True):
                assert admit(kv, request, token_budget=8) == (0, 8)  # the budget cuts the prompt
                request.num_computed_tokens = 8
                kv.cache_blocks(request, 8)
            assert remote.num_round_trips == 1 and remote.get_block_ids("a") == local.get_block_ids("a")
            second = [Request("b", list(range(1, 13)), params), Request("b", list(range(1, 13)), params)]
            assert [admit(kv, r, token_budget=8) for kv, r in zip((remote, local), second, strict=True)] == [(8, 4)] * 2
            assert remote.num_round_trips == 2 and remote.get_block_ids("b") == local.get_block_ids("b")
            too_big = Request("c", list(range(100, 160)), params)
            assert admit(remote, too_big, token_budget=64) is None and remote.num_round_trips == 3
            # A run: each gets what the one before left of the budget; "f" finds no free block,
            # so neither it nor "g" after it is admitted (though "g" would fit). "d" and "e" cover
            # the budget even with no hit, so they go in one round trip; hits leave budget over,
            # and "f" goes in a second.
            for kv, request in zip((remote, local), second, strict=True):
                kv.cache_blocks(request, 12)
            run = {
                kv: [
                    Request(r, list(range(1, 9)) + [i] * n, params)
                    for r, i, n in (("d", 50, 4), ("e", 60, 8), ("f", 70, 30), ("g", 80, 1))
                ]
                for kv in (remote, local)
            }
            results = [admit_in_order(kv, requests, token_budget=20) for kv, requests in run.items()]
            assert results[0] == results[1] == [(8, 4), (8, 8)] and remote.num_round_trips == 5
            for r in "defg":
                assert remote.get_block_ids(r) == local.get_block_ids(r)
            assert admit_in_order(remote, run[remote][2:], token_budget=20) == [] and remote.num_round_trips == 6
            short = {
                kv: [Request(r, list(range(1, 9)) + [i] * 20, params) for r, i in (("h", 90), ("k", 91))] for kv in run
            }
            results = [admit_in_order(kv, requests, token_budget=4) for kv, requests in short.items()]
            assert results[0] == results[1] == [(8, 4)], "the budget was used up: k is not tried"
            assert remote.get_block_ids("h") == local.get_block_ids("h") and not remote.get_block_ids("k")
            remote.check_invariants()
    finally:
        service.stop()


@pytest.mark.slow
def test_allocate_slots_gives_the_same_answer_remote_and_in_process() -> None:
    """The interface's contract: the number of new blocks (0 when the held ones have room), or
    None when too few are free; the client answers a promised allocation without a round trip."""
    service = ComponentProcess.start(
        "kv-alloc",
        "modkit.kvcache.service:KVCacheService",
        {"num_blocks": [6], "block_size": 4},
        ipc_address("kv-b.rpc"),
    )
    try:
        with service.client(timeout_s=10) as rpc:
            remote, local = KVCacheManagerClient(rpc, 0, 4), KVCacheManager(6, 4)
            requests = {kv: Request("x", list(range(1, 7)), SamplingParams()) for kv in (remote, local)}
            answers: dict[object, list[int | None]] = {remote: [], local: []}
            for kv, request in requests.items():
                answers[kv].append(kv.allocate_slots(request, 6))  # 2 new blocks
                request.num_computed_tokens = 6
                answers[kv].append(kv.allocate_slots(request, 2))  # 8 tokens: the 2 blocks have room
                answers[kv].append(kv.allocate_slots(request, 3))  # 9 tokens: 1 more
                answers[kv].append(kv.allocate_slots(request, 20))  # 26 tokens: 7 blocks, more than there are
            assert answers[remote] == answers[local] == [2, 0, 1, None]
            assert remote.num_promised == 1, "the third allocation was promised from the last reply's free count"
            assert remote.get_block_ids("x") == local.get_block_ids("x")
            remote.check_invariants()
    finally:
        service.stop()


def test_the_kv_cache_manager_notes_block_activity_only_while_someone_subscribes(tmp_path: Path) -> None:
    """Nobody subscribed to ``blocks.0``: no ``BlockActivity`` is even built. A subscriber gets every call's."""
    service = KVCacheService([16], 4, events_address=f"ipc://{tmp_path}/kv.events")
    try:
        service.apply(0, [KVAdmit("a", list(range(1, 11)), 0, 16), KVCacheComputed("a", [], 10)])
        assert not service.watched and service.activity == []
        with Subscriber(service.publisher.publisher.address, topics=["blocks."], payload_type=PipelineEvent) as sub:
            deadline = time.monotonic() + 5
            while not service.publisher.wants("blocks.0") and time.monotonic() < deadline:
                time.sleep(0.01)
            reply = service.apply(0, [KVAdmit("b", list(range(1, 13)), 0, 16)])
            assert service.watched and reply.results[0][1:] == [8, 4]  # 8 tokens hit, 4 to compute
            delivery = sub.recv(2.0)
            assert delivery is not None and isinstance(delivery.payload, BlockEvents)
            kinds = [(a.kind, a.req_id) for a in delivery.payload.activity]
            assert ("hit", "b") in kinds and ("allocated", "b") in kinds, kinds
    finally:
        service.close()


# -- a launched pipeline --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline() -> Iterator[Pipeline]:
    # Unsupervised: a test here watches what happens while a killed worker stays dead
    # (tests/faults/test_supervisor.py tests the supervisor that would restart it).
    with Pipeline.launch(
        num_workers=2,
        num_kv_blocks=256,
        max_model_len=512,
        router_policy="round_robin",
        supervise=False,
        progress=False,
        **free_ports(),
    ) as p:
        yield p


@pytest.mark.slow
def test_every_component_answers_health_and_stats_on_its_port(pipeline: Pipeline) -> None:
    health = pipeline.health()
    assert sorted(health) == sorted(COMPONENTS)
    for name, body in health.items():
        assert body["http_status"] == 200 and body["status"] == "ok", (name, body)
        assert body["component"] == name and body["implementation"] and body["uptime_s"] >= 0
        assert body["pid"] == pipeline.pids()[name]
    stats = pipeline.stats()
    assert all(s["http_status"] == 200 for s in stats.values()), stats
    assert stats["kv_cache_manager"]["pools"][0]["kv_blocks_total"] == 255
    for name in ("scheduler", "router", "kv_cache_manager", "sampler", "worker-0", "worker-1"):
        loop = stats[name]["loop"]  # each serve loop's clock: how much of its time it worked
        assert loop["busy_s"] + loop["idle_s"] == pytest.approx(loop["elapsed_s"]), (name, loop)
        assert 0 <= loop["busy_fraction"] <= 1 and loop["num_turns"] > 0, (name, loop)
    assert stats["kv_cache_manager"]["loop"]["busy_fraction"] < 0.5, "a passive manager waits for calls"
    assert [w["num_blocks"] for n, w in health.items() if n.startswith("worker")] == [256, 256]
    # launch returned only once the router's subscription reached the KV cache manager
    assert health["kv_cache_manager"]["kv_events_subscribed"] is True
    url = pipeline.urls()["scheduler"].removesuffix("/health")
    assert httpx.get(f"{url}/nothing").status_code == 404


@pytest.mark.slow
def test_requests_spread_over_workers_and_each_step_is_the_schedulers(pipeline: Pipeline) -> None:
    client = pipeline.client(timeout=60)
    before = pipeline.stats()
    replies = [hello(client) for _ in range(4)]
    assert all(r.startswith("Hello") for r in replies)

    def settled() -> bool:  # a step planned ahead of a reply's last one may still be running
        return all(w["num_steps_in_flight"] == 0 for w in pipeline.stats()["scheduler"]["workers"])

    wait_for(settled, 10, "the steps in flight")
    after = pipeline.stats()
    assert after["router"]["decisions"] == {"0": 2, "1": 2} or sum(after["router"]["decisions"].values()) >= 4
    for i in (0, 1):
        ran = after[f"worker-{i}"]["num_steps"] - before[f"worker-{i}"]["num_steps"]
        scheduled = after["scheduler"]["workers"][i]["num_steps"] - before["scheduler"]["workers"][i]["num_steps"]
        assert ran == scheduled > 0, "each worker runs exactly the steps the scheduler planned for it"
        kv = after["scheduler"]["workers"][i]
        assert kv["kv_round_trips"] > 0 and kv["kv_round_trip_s_total"] > kv["kv_manager_s_total"] > 0, kv
    ahead = [
        after["scheduler"]["workers"][i]["num_planned_ahead"] - before["scheduler"]["workers"][i]["num_planned_ahead"]
        for i in (0, 1)
    ]
    assert sum(ahead) > 0, "async scheduling: steps were planned while the step before ran"
    sampler = after["sampler"]
    assert sampler["num_tokens_sampled"] > before["sampler"]["num_tokens_sampled"]
    assert "ready" in pipeline.logs("scheduler")


@pytest.mark.slow
def test_wait_held_counts_held_requests_and_raises_what_ended_one_before_it_was_held(pipeline: Pipeline) -> None:
    client = pipeline.client(timeout=60)
    good = {"model": pipeline.model_name, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    with ThreadPoolExecutor(3) as pool:
        pipeline.hold_requests(True)
        try:
            futures = [pool.submit(client.completions.create, **good) for _ in range(2)]
            assert pipeline.wait_held(2, futures) == 2
            assert not any(f.done() for f in futures), "held: none has been answered"
            with pytest.raises(TimeoutError, match="2 of 3 requests held"):
                pipeline.wait_held(3, futures, timeout_s=0.2)
            # Refused by the frontend, it never reaches the scheduler: its 400 comes back at once.
            refused = pool.submit(client.completions.create, **{**good, "max_tokens": -1})
            with pytest.raises(openai.BadRequestError, match="max_tokens"):
                pipeline.wait_held(3, [*futures, refused], timeout_s=30)
        finally:
            pipeline.hold_requests(False)
        assert [f.result().usage.completion_tokens for f in futures] == [2, 2]
        # Sent while the hold was off, it was answered: waiting for it to be held says so.
        answered = pool.submit(client.completions.create, **good)
        answered.result()
        try:
            with pytest.raises(RuntimeError, match="finished before it was held"):
                pipeline.wait_held(1, [answered], timeout_s=30)
        finally:
            pipeline.hold_requests(False)  # wait_held keeps the hold on: the next tests need it off


@pytest.mark.slow
def test_a_restarted_component_serves_again(pipeline: Pipeline) -> None:
    old = pipeline.pids()["router"]
    pipeline.restart("router")
    assert pipeline.pids()["router"] != old and not pid_exists(old)
    assert hello(pipeline.client(timeout=60)).startswith("Hello")
    with pytest.raises(KeyError, match="no component"):
        pipeline.logs("nope")


@pytest.mark.slow
def test_a_killed_worker_is_routed_around(pipeline: Pipeline) -> None:
    """Requests running on the killed worker move to the live one and finish as if nothing happened."""
    client = pipeline.client(timeout=120)
    conversations = [[{"role": "user", "content": q}] for q in ("Hello!", "What does a cow say?", "Who are you?")] * 2

    def stream(messages: list[dict[str, str]]) -> tuple[str, int]:
        chunks = client.chat.completions.create(
            model=EMBEDDED_MODEL_NAME,
            messages=messages,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=120,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, tokens = [], 0
        for chunk in chunks:
            text += [c.delta.content or "" for c in chunk.choices]
            tokens = chunk.usage.completion_tokens if chunk.usage else tokens
        return "".join(text), tokens

    with ThreadPoolExecutor(len(conversations)) as pool:
        streams = [pool.submit(stream, c) for c in conversations]

        def running_on_both() -> bool:
            workers = pipeline.stats()["scheduler"]["workers"]
            return all(w["num_requests_running"] > 0 and w["num_steps"] > 0 for w in workers)

        wait_for(running_on_both, 30, "requests running on both workers")
        os.kill(pipeline.pids()["worker-1"], signal.SIGKILL)
        served = [s.result(timeout=120) for s in streams]
    assert [n for _, n in served] == [120] * len(conversations)  # every token, none lost or repeated
    expected = LLM(num_kv_blocks=256).chat(
        conversations, SamplingParams(temperature=0, max_tokens=120, ignore_eos=True), use_tqdm=False
    )
    assert [t for t, _ in served] == [o.outputs[0].text for o in expected]
    assert pipeline.stats()["scheduler"]["num_moved"] > 0

    def router_noticed() -> bool:
        return pipeline.health()["router"]["workers_alive"] == [0]

    wait_for(router_noticed, 15, "the router to mark worker-1 dead")
    assert pipeline.health()["worker-1"]["http_status"] is None  # its port is gone with it
    before = pipeline.stats()["router"]["decisions"]
    assert all(hello(client).startswith("Hello") for _ in range(4))
    after = pipeline.stats()["router"]["decisions"]
    assert after.get("1", 0) == before.get("1", 0) and after["0"] == before.get("0", 0) + 4
    assert pipeline.health()["scheduler"]["workers_alive"] == [0]

    pipeline.restart("worker-1")  # back, with an empty cache: routed to again

    def back() -> bool:
        health = pipeline.health()
        return health["router"]["workers_alive"] == health["scheduler"]["workers_alive"] == [0, 1]

    wait_for(back, 15, "worker-1 to be routed to again")
    assert all(hello(client).startswith("Hello") for _ in range(4))
    assert pipeline.stats()["router"]["decisions"]["1"] == after.get("1", 0) + 2


@pytest.mark.slow
def test_shutdown_leaves_no_process_port_or_socket_file() -> None:
    ports = free_ports()
    p = Pipeline.launch(num_kv_blocks=64, supervise=False, progress=False, **ports)  # the killed worker stays dead
    pids, ipc_dir = p.pids(), Path(p.addresses.ipc_dir)
    assert hello(p.client(timeout=60)).startswith("Hello")
    os.kill(pids["worker-0"], signal.SIGKILL)  # the only worker: nothing can serve

    def unavailable() -> bool:
        return pipeline_health_codes(p) == {"router": 503, "scheduler": 503, "worker-0": None, "frontend": 503}

    wait_for(unavailable, 15, "router, scheduler and frontend to answer 503")
    health = p.health()
    assert health["router"]["error"] == "no worker is alive"
    assert health["frontend"]["status"] == "unavailable" and health["frontend"]["error"] == "router: no worker is alive"
    with pytest.raises(openai.InternalServerError) as refused:
        hello(p.client(timeout=60))
    assert refused.value.status_code == 503 and refused.value.body["type"] == "server_error"  # type: ignore[index]
    p.shutdown()
    p.shutdown()  # idempotent
    assert not [name for name, pid in pids.items() if pid_exists(pid)]
    assert all(port_is_free(port) for port in ports.values())
    assert not ipc_dir.exists()


def pipeline_health_codes(p: Pipeline) -> dict[str, int | None]:
    """The components whose /health is not 200, with their HTTP status (None: nothing answers)."""
    return {name: body["http_status"] for name, body in p.health().items() if body["http_status"] != 200}


def test_a_taken_port_is_named_before_anything_starts() -> None:
    ports = free_ports()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["router_port"]))
        taken.listen()
        with pytest.raises(PortInUseError, match=f"port {ports['router_port']} of router is in use"):
            Pipeline.launch(progress=False, **ports)


@pytest.mark.slow
def test_a_bad_config_value_is_refused_before_anything_starts() -> None:
    with pytest.raises(ConfigError, match="block_size"):
        Pipeline.launch(block_size=0, progress=False)
    with pytest.raises(ConfigError, match="max_model_len"):
        Pipeline.launch(max_model_len=10**9, progress=False)
    with pytest.raises(ConfigError, match=r"did you mean 'scheduler\.in'"):
        Pipeline.launch(addresses={"scheduler.inn": "tcp://127.0.0.1:9000"}, progress=False)
    with pytest.raises(ConfigError, match="allow_remote"):
        Pipeline.launch(addresses={"scheduler.in": "tcp://0.0.0.0:9000"}, progress=False)
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "start_all.py"), "--num-workers", "zero"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "num_workers" in done.stderr


@pytest.mark.slow
def test_start_all_drains_then_stops_everything_on_sigterm(tmp_path: Path) -> None:
    laid_out = with_ports(PipelineConfig(), "auto").ports()  # a free run of ports, 8001-8006's layout
    ports = {f"{name.replace('-0', '')}_port": port for name, port in laid_out.items()}
    flags = ["--ports", str(laid_out["frontend"])]  # start_all lays them out from the first
    log = tmp_path / "start_all.log"
    save_trace = ["--save-trace", str(tmp_path / "served.json.gz")]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "start_all.py"), "--num-kv-blocks", "64", *flags, *save_trace],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: "serving" in log.read_text() or proc.poll() is not None, 120, "start_all to serve")
        assert proc.poll() is None, log.read_text()
        pids = []
        for name, port in ports.items():
            body = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
            assert body["status"] == "ok", (name, body)
            pids.append(body["pid"])
        url = f"http://127.0.0.1:{ports['frontend_port']}"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        long = client.chat.completions.create(
            model=EMBEDDED_MODEL_NAME,
            messages=[{"role": "user", "content": "Hello!"}],
            max_tokens=200,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        first = next(iter(long))  # in flight when SIGTERM comes
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 503, 10, "the frontend to drain")
        assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "draining"
        with pytest.raises(openai.InternalServerError) as refused:
            hello(client)
        assert refused.value.status_code == 503
        rest = list(long)  # the request in flight finishes in full
        assert len([first, *rest]) >= 200 and rest[-1].choices[0].finish_reason == "length"
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped" in log.read_text()
    served = Trace.load(tmp_path / "served.json.gz").requests.set_index("req_id")  # what it served, as it saw it
    assert served.loc[first.id, "num_output_tokens"] == 200
    assert served.loc[first.id, "finish_reason"] == "length"
    assert not [pid for pid in pids if pid_exists(pid)]
    assert all(port_is_free(port) for port in ports.values())


@pytest.mark.slow
def test_a_component_runs_alone(tmp_path: Path) -> None:
    port = free_tcp_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "modkit.sampler", "--ipc-dir", str(tmp_path / "ipc"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["component"] == "sampler"
            except httpx.HTTPError:
                return False

        wait_for(healthy, 60, "the sampler's /health")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert port_is_free(port)


def children_of(pid: int) -> set[int]:
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in text:
            found.add(int(status.parent.name))
    return found


LAUNCH_SCRIPT = """
import os, signal, sys, json
from modkit import LLM, Pipeline
ports = json.loads(sys.argv[2])
# As a notebook kernel does: Ctrl-C raises KeyboardInterrupt, also where this script's
# parent ignores SIGINT (a shell's background job does, and its children inherit that).
signal.signal(signal.SIGINT, signal.default_int_handler)
if sys.argv[1] == "interrupt":  # a notebook cell interrupt, while the components start
    start = Pipeline._start

    def start_then_interrupt(self, spec, say):
        if spec.name == "router":  # one of those started together, on a thread of the launch
            os.kill(os.getpid(), signal.SIGINT)
        start(self, spec, say)

    Pipeline._start = start_then_interrupt
    try:
        Pipeline.launch(num_kv_blocks=64, progress=False, **ports)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
else:  # launched, used, and left without shutdown(): the interpreter's exit must clean up
    p = Pipeline.launch(num_kv_blocks=64, progress=False, **ports)
    print("launched", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["interrupt", "exit"])
def test_no_process_outlives_an_interrupted_launch_or_a_forgotten_pipeline(how: str, tmp_path: Path) -> None:
    ports = free_ports()
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), how, json.dumps(ports)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    seen: set[int] = set()
    while proc.poll() is None:  # every component process the launcher starts is its child
        seen |= children_of(proc.pid)
        time.sleep(0.05)
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert proc.returncode == 0 and ("interrupted" if how == "interrupt" else "launched") in output, output
    assert len(seen) >= 3, f"expected component processes, saw {seen}"
    wait_for(lambda: not [pid for pid in seen if pid_exists(pid)], 10, "every component process to exit")
    assert all(port_is_free(port) for port in ports.values())


@pytest.mark.slow
def test_kv_aware_routing_sends_a_shared_prefix_to_the_worker_that_caches_it() -> None:
    system = "You are a helpful assistant who answers questions about animals and colors. " * 4
    with Pipeline.launch(
        num_workers=2, num_kv_blocks=128, router_policy="kv_aware", progress=False, **free_ports()
    ) as p:
        client = p.client(timeout=60)

        def ask(question: str) -> None:
            client.completions.create(model=EMBEDDED_MODEL_NAME, prompt=system + question, max_tokens=4, temperature=0)

        # launch returned once the router's subscription reached the KV cache manager (ZeroMQ drops
        # what a publisher sends before that): the first request's cached blocks reach the router.
        assert p.health()["kv_cache_manager"]["kv_events_subscribed"] is True

        ask("What does a cow say?")
        first = {k: v for k, v in p.stats()["router"]["decisions"].items() if v}
        assert len(first) == 1
        (warm,) = first

        def router_heard_all() -> bool:
            # The router's view of each pool holds every event it published: as they came, or in the
            # snapshot routing took of a pool whose first events (clearing it at start) went out
            # before the router's subscription arrived, and no later one came.
            stats = p.stats()  # the router's counts first: they can only catch up with the manager's
            workers, pools = stats["router"]["workers"], stats["kv_cache_manager"]["pools"]
            held = [w["kv_view_events"] for w in workers]
            return held == [pool["num_kv_events"] for pool in pools] and sum(held) > 0

        wait_until(router_heard_all, 10, interval_s=0.2)
        stats = p.stats()
        assert router_heard_all() and stats["router"]["workers"][int(warm)]["num_cached_blocks"] > 0, (
            f"the router never learned the cached blocks: {stats['router']} {stats['kv_cache_manager']}"
        )
        for question in ("What does a dog say?", "What color is the sky?", "Who are you?"):
            ask(question)
        stats = p.stats()
        assert stats["router"]["decisions"] == {warm: 4}, stats["router"]
        pool = stats["kv_cache_manager"]["pools"][int(warm)]
        assert pool["prefix_cache_hits"] >= 3 * 16, pool  # each later request reused the system prompt's blocks

        # A restarted router heard none of those events: before it routes, it takes a snapshot of each
        # pool, so it knows every cached block (the request's own new blocks alone would be far fewer).
        p.restart("router")
        ask("What does a horse say?")

        def router_knows_the_pools() -> bool:
            stats = p.stats()
            known = [w["num_cached_blocks"] for w in stats["router"]["workers"]]
            return known == [pool["kv_blocks_cached"] for pool in stats["kv_cache_manager"]["pools"]]

        assert wait_until(router_knows_the_pools, 10, interval_s=0.2), p.stats()
        stats = p.stats()
        assert stats["router"]["decisions"] == {warm: 1} and stats["router"]["kv_snapshots"] >= 1, stats["router"]


@pytest.mark.slow
def test_every_socket_can_be_given_another_endpoint() -> None:
    """All of them on loopback TCP, as components in separate containers would have them."""
    http = free_ports()
    names = socket_names(1)
    ports = distinct_free_ports(len(names), taken=set(http.values()))
    endpoints = {name: f"tcp://127.0.0.1:{port}" for name, port in zip(names, ports, strict=True)}
    with Pipeline.launch(num_kv_blocks=64, addresses=endpoints, progress=False, **http) as p:
        assert hello(p.client(timeout=60)).startswith("Hello")
        assert all(body["http_status"] == 200 for body in p.health().values())
        assert not list(Path(p.addresses.ipc_dir).glob("*.in"))  # no inbox fell back to an ipc file


@pytest.mark.slow
def test_the_six_components_started_by_hand_serve_together(tmp_path: Path) -> None:
    """``python -m modkit.<component>`` for each, one shared --ipc-dir: the pipeline without the launcher."""
    ports = free_ports()
    flags = [a for name, port in ports.items() for a in (f"--{name.replace('_', '-')}", str(port))]
    common = ["--ipc-dir", str(tmp_path / "ipc"), "--num-kv-blocks", "64", *flags]
    commands = {
        "sampler": ["modkit.sampler"],
        "worker-0": ["modkit.worker", "--worker-id", "0"],
        "kv_cache_manager": ["modkit.kvcache"],
        "scheduler": ["modkit.scheduler"],
        "router": ["modkit.router"],
        "frontend": ["modkit.frontend"],
    }
    procs = {}
    try:
        for name, command in commands.items():
            log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
            procs[name] = subprocess.Popen([sys.executable, "-m", *command, *common], stdout=log, stderr=log)
        url = f"http://127.0.0.1:{ports['frontend_port']}"

        def serving() -> bool:
            assert all(p.poll() is None for p in procs.values()), {n: p.returncode for n, p in procs.items()}
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(serving, 120, "the hand-started pipeline's frontend")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert hello(client).startswith("Hello")
        for name in ("scheduler", "worker", "router", "kv_cache_manager", "sampler"):
            body = httpx.get(f"http://127.0.0.1:{ports[f'{name}_port']}/health", timeout=5).json()
            assert body["status"] == "ok", body
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        codes = {name: proc.wait(timeout=30) for name, proc in procs.items()}
    assert set(codes.values()) <= {0}, codes


@pytest.mark.slow
def test_a_step_that_fails_fails_its_requests_and_the_worker_serves_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])))
    with Pipeline.launch(num_kv_blocks=64, progress=False, **free_ports()) as p:
        p.restart("worker-0", target="pipeline_targets:PoisonedWorker")
        client = p.client(timeout=60)
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as failed:
                reply = client.completions.create(
                    model=EMBEDDED_MODEL_NAME, prompt=[POISON_TOKEN, 5, 6, 7], max_tokens=5, stream=stream
                )
                if stream:  # the error comes as the first thing the stream has
                    list(reply)  # type: ignore[arg-type]
            assert failed.value.status_code == 503 and "poisoned prompt" in str(failed.value)
        health = p.health()["worker-0"]
        assert health["http_status"] == 503 and "poisoned prompt" in health["error"]
        assert hello(client).startswith("Hello")  # the same worker, next step
        assert p.health()["worker-0"]["http_status"] == 200
        stats = p.stats()
        assert stats["worker-0"]["num_failed_steps"] == 2 and stats["scheduler"]["workers"][0]["num_failed_steps"] == 2
        pool = stats["kv_cache_manager"]["pools"][0]
        assert pool["kv_blocks_free"] == pool["kv_blocks_total"]  # the failed requests' blocks came back
