"""Components on several hosts, played on one machine: each on its own loopback address, CURVE on.

The six components start as separate processes by the commands docs/scaling.md gives
for several hosts (``python -m modkit.<component> --config pipeline.yaml --keys DIR``),
the worker bound to 127.0.0.2 and the others to 127.0.0.3, every socket on TCP, with
keys from ``python -m modkit keys``. A chat comes back as the in-process ``LLM`` writes it;
a peer without the keys (a plain ZeroMQ socket, or CURVE with a key pair of its own)
cannot call, push into an inbox or subscribe; and a non-loopback address without keys is
refused before anything starts.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest
import yaml
import zmq
from waiting import wait_until
from zmq.utils.monitor import recv_monitor_message

from modkit import LLM
from modkit.config import ConfigError, PipelineConfig, free_component_ports
from modkit.frontend import EMBEDDED_MODEL_NAME
from modkit.pipeline.addresses import owner, socket_names
from modkit.protocol import LaunchKeys
from modkit.sampling_params import SamplingParams
from modkit.transport import RpcClient, RpcTimeoutError, Subscriber, security
from modkit.transport.keyfiles import load_keys

pytestmark = pytest.mark.slow

WORKER_HOST, OTHERS_HOST = "127.0.0.2", "127.0.0.3"
COMMANDS = {  # component -> its module, as each host runs it
    "sampler": ["modkit.sampler"],
    "worker-0": ["modkit.worker", "--worker-id", "0"],
    "kv_cache_manager": ["modkit.kvcache"],
    "scheduler": ["modkit.scheduler"],
    "router": ["modkit.router"],
    "frontend": ["modkit.frontend"],
}
QUESTIONS = ["Hello!", "What does a dog say?"]


def host_of(component: str) -> str:
    return WORKER_HOST if component.startswith("worker") else OTHERS_HOST


def free_run_of_ports(count: int) -> int:
    """A first port from which ``count`` ports are free on both hosts (racy, as any free port is)."""
    pick = random.Random()
    for _ in range(200):
        first = pick.randrange(20000, 32000 - count)
        if all(_bindable(host, port) for port in range(first, first + count) for host in (WORKER_HOST, OTHERS_HOST)):
            return first
    raise RuntimeError(f"no run of {count} free ports")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def modkit_command(*args: str) -> str:
    """What ``python -m modkit ARGS`` prints."""
    return subprocess.run([sys.executable, "-m", "modkit", *args], check=True, capture_output=True, text=True).stdout


class HandStarted:
    """The pipeline's processes, each started by its own command; ``stop`` ends every one."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.keys_dir = tmp / "keys"
        modkit_command("keys", str(self.keys_dir))
        self.keys = load_keys(self.keys_dir)
        first_port = str(free_run_of_ports(len(socket_names(1))))
        layout = ["--first-port", first_port, "--host", OTHERS_HOST, "--on", f"worker-0={WORKER_HOST}"]
        self.addresses = yaml.safe_load(modkit_command("addresses", *layout))["addresses"]
        self.ports = free_component_ports(1)
        config = {"num_kv_blocks": 64, "host": OTHERS_HOST, "addresses": self.addresses, **self.ports}
        self.config_file = tmp / "pipeline.yaml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, names: list[str] | None = None) -> None:
        """Start ``names`` (by default all six, in ``COMMANDS``' order)."""
        common = ["--config", str(self.config_file), "--keys", str(self.keys_dir)]
        for name in names or list(COMMANDS):
            command = COMMANDS[name]
            with open(self.tmp / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
                self.procs[name] = subprocess.Popen([sys.executable, "-m", *command, *common], stdout=log, stderr=log)

    @property
    def url(self) -> str:
        return f"http://{OTHERS_HOST}:{self.ports['frontend_port']}"

    def health(self) -> httpx.Response | None:
        """The frontend's ``GET /health``; None while nothing listens yet."""
        died = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        assert not died, f"exited: {died}; logs in {self.tmp}"
        try:
            return httpx.get(f"{self.url}/health", timeout=5)
        except httpx.HTTPError:
            return None

    def serving(self) -> bool:
        health = self.health()
        return health is not None and health.status_code == 200

    def stop(self) -> dict[str, int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HandStarted]:
    hand = HandStarted(tmp_path_factory.mktemp("multihost"))
    try:
        hand.start()
        assert wait_until(hand.serving, 120), f"the frontend never served; logs in {hand.tmp}"
        yield hand
    finally:
        codes = hand.stop()
    assert set(codes.values()) <= {0}, codes


def chat(url: str, question: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.chat.completions.create(
        model=EMBEDDED_MODEL_NAME, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=16
    )
    return reply.choices[0].message.content or ""


def test_a_chat_across_the_hosts_equals_the_in_process_engine(pipeline: HandStarted) -> None:
    served = [chat(pipeline.url, q) for q in QUESTIONS]
    expected = LLM(num_kv_blocks=64).chat(
        [[{"role": "user", "content": q}] for q in QUESTIONS],
        SamplingParams(temperature=0, max_tokens=16),
        use_tqdm=False,
    )
    assert served == [o.outputs[0].text for o in expected]
    for component in ("scheduler", "worker", "router", "kv_cache_manager", "sampler"):
        port = pipeline.ports[f"{component}_port"]
        assert httpx.get(f"http://{OTHERS_HOST}:{port}/health", timeout=5).json()["status"] == "ok"


def test_the_frontend_says_it_serves_only_once_a_worker_is_up(tmp_path: Path) -> None:
    # Components started in any order, the worker last (a Compose that cannot wait for a service to
    # be healthy, such as podman-compose 4, starts them all at once and the worker loads a model):
    # /health answers 503 until the router has heard the worker, so a client that waits for a 200
    # is never answered with an error for its first request.
    hand = HandStarted(tmp_path)
    try:
        hand.start([name for name in COMMANDS if name != "worker-0"])
        assert wait_until(lambda: hand.health() is not None, 60), f"the frontend never listened; logs in {tmp_path}"
        health = hand.health()
        assert health is not None and health.status_code == 503, health and health.text
        assert health.json()["status"] == "starting", health.json()
        assert health.json()["error"] == "router: no worker has sent a heartbeat yet", health.json()
        with pytest.raises(openai.APIStatusError) as caught:  # sent anyway: refused, not left waiting
            chat(hand.url, QUESTIONS[0])
        assert caught.value.status_code == 503, caught.value
        hand.start(["worker-0"])
        assert wait_until(hand.serving, 120), f"the frontend never served; logs in {tmp_path}"
        expected = LLM(num_kv_blocks=64).chat(
            [{"role": "user", "content": QUESTIONS[0]}], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False
        )
        assert chat(hand.url, QUESTIONS[0]) == expected[0].outputs[0].text
    finally:
        codes = hand.stop()
    assert set(codes.values()) <= {0}, codes


def test_every_socket_is_on_its_host_and_speaks_curve(pipeline: HandStarted) -> None:
    for name, endpoint in pipeline.addresses.items():
        assert endpoint.startswith(f"tcp://{host_of(owner(name))}:"), (name, endpoint)
    for name, endpoint in pipeline.addresses.items():
        assert handshake(peer_kind(name), endpoint, pipeline.keys) == "succeeded", name


# -- a peer without the launch's keys ------------------------------------------------------------


def strangers(keys: LaunchKeys) -> dict[str, LaunchKeys | None]:
    """A plain socket, and a CURVE client with a key pair of its own (the server's public key is no secret)."""
    own = security.new_launch_keys()
    return {"plain": None, "own CURVE keys": msgspec.structs.replace(own, server_public=keys.server_public)}


def peer_kind(socket_name: str) -> int:
    """The kind of socket that connects to ``socket_name``: a call, a push into an inbox, or a subscription."""
    return {"rpc": zmq.DEALER, "in": zmq.PUSH}.get(socket_name.rpartition(".")[2], zmq.SUB)


def handshake(kind: int, address: str, keys: LaunchKeys | None, timeout_s: float = 10.0) -> str:
    """Connect a ``kind`` socket to ``address`` as ``keys``' client: "succeeded", "failed", or "none" (no answer)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket()
    try:
        security.connect(sock, address, keys)
        deadline = time.monotonic() + timeout_s
        while monitor.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return "succeeded"
            if event in (
                zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
            ):
                return "failed"
        return "none"
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


@pytest.mark.parametrize("who", ["plain", "own CURVE keys"])
def test_a_peer_without_the_keys_cannot_call(pipeline: HandStarted, who: str) -> None:
    stranger = strangers(pipeline.keys)[who]
    address = pipeline.addresses["worker-0.rpc"]
    for method in ("health", "info"):  # an open liveness read too: CURVE stops it before the call is read
        with RpcClient(address, timeout_s=2.0, keys=stranger) as rpc, pytest.raises(RpcTimeoutError):
            rpc.call(method)
    assert handshake(zmq.DEALER, address, stranger) == "failed"
    with RpcClient(address, timeout_s=10.0, keys=pipeline.keys) as rpc:  # the launch's keys: it answers
        assert rpc.call("info")["num_blocks"] == 64


@pytest.mark.parametrize("who", ["plain", "own CURVE keys"])
@pytest.mark.parametrize("inbox", ["scheduler.in", "worker-0.in", "router.in", "frontend.in", "sampler.in"])
def test_a_peer_without_the_keys_cannot_push_into_an_inbox(pipeline: HandStarted, who: str, inbox: str) -> None:
    # No handshake, no message: ZeroMQ hands a PUSH socket's messages only to a peer it completed one with.
    assert handshake(zmq.PUSH, pipeline.addresses[inbox], strangers(pipeline.keys)[who]) == "failed"


@pytest.mark.parametrize("who", ["plain", "own CURVE keys"])
def test_a_peer_without_the_keys_cannot_subscribe(pipeline: HandStarted, who: str) -> None:
    address = pipeline.addresses["scheduler.ev"]
    assert handshake(zmq.SUB, address, strangers(pipeline.keys)[who]) == "failed"
    with (
        Subscriber(address, keys=strangers(pipeline.keys)[who]) as stranger,
        Subscriber(address, keys=pipeline.keys) as member,
    ):
        deliveries: list[Any] = []

        def member_hears() -> bool:
            chat(pipeline.url, "Hi")
            deliveries.append(member.recv(1.0))
            return deliveries[-1] is not None

        assert wait_until(member_hears, 30), "the member never heard the scheduler's events"
        assert stranger.recv(1.0) is None


# -- refused at once -------------------------------------------------------------------------------


def test_a_non_loopback_address_without_keys_is_refused_at_once(tmp_path: Path) -> None:
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"allow_remote": True, "addresses": {"worker-0.in": "tcp://192.0.2.7:9110"}}))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "modkit.scheduler", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "worker-0.in" in done.stderr and "--keys" in done.stderr, done.stderr
    assert time.monotonic() - started < 30  # before loading or binding anything


@pytest.mark.parametrize(
    ("addresses", "says"),
    [
        ({"router.in": "tcp://127.0.0.3:*"}, "needs a port 1 to 65535"),
        ({"router.in": "tcp://127.0.0.3:9100", "scheduler.in": "tcp://127.0.0.3:9100"}, "to both 'router.in' and"),
        ({"worker-0.in": "tcp://192.0.2.7:9100"}, "not a loopback address"),  # allow_remote is not set
    ],
)
def test_an_address_no_peer_could_use_is_refused(addresses: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match="addresses") as caught:
        PipelineConfig(addresses=addresses)
    assert says in str(caught.value), str(caught.value)


def test_keys_others_could_read_are_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "modkit", "keys", str(keys)], check=True, capture_output=True)
    assert {p.name: p.stat().st_mode & 0o777 for p in keys.iterdir()} == dict.fromkeys(
        ["hmac.key", "server.key_secret", "client.key_secret"], 0o600
    )
    assert keys.stat().st_mode & 0o777 == 0o700
    again = subprocess.run([sys.executable, "-m", "modkit", "keys", str(keys)], capture_output=True, text=True)
    assert again.returncode == 2 and "already holds" in again.stderr  # an existing key is never overwritten
    (keys / "client.key_secret").chmod(0o644)
    done = subprocess.run(
        [sys.executable, "-m", "modkit.router", "--keys", str(keys)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "client.key_secret has mode 0644" in done.stderr, done.stderr
