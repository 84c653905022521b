"""Control is authenticated: calls without the launch's key are refused, TCP sockets need CURVE keys.

The attacker of issue 19 reached a component's socket as another process (another local
user, over the documented TCP override) and called ``hold_new_requests``, ``swap`` and a
swap by ``import_path``. Here a raw ZeroMQ socket makes those calls, unsigned, signed
under another launch's key, tampered with, stale and replayed, on every component's RPC
socket; each is refused with ``PermissionError`` and changes nothing (nothing held,
nothing imported, no block taken, every component still serving). The same calls through
``Pipeline`` still work. The pipeline runs with some sockets on CURVE TCP (loopback):
it answers as the in-process engine does, while a socket without the keys can neither
call, push nor subscribe there. ``/stats`` asks for the API key, ``/health`` does not.
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from waiting import wait_until
from zmq.utils.monitor import recv_monitor_message

from modkit import LLM, Pipeline, SamplingParams
from modkit.protocol import PING, SHUTDOWN, AbortRequest, Call, ErrorReply, KVAdmit, LaunchKeys, Reply
from modkit.swap import ImplSpec
from modkit.transport import Inbox, Outbox, encode, tcp_address
from modkit.transport.addresses import free_tcp_ports
from modkit.transport.security import mac, new_launch_keys

pytestmark = pytest.mark.timeout(300)

API_KEY = "sk-control-auth"
QUESTION: list[Any] = [{"role": "user", "content": "Name three colours."}]
TCP_SOCKETS = ("router.rpc", "scheduler.in", "worker-0.in", "frontend.in", "kv.events", "scheduler.ev")
PROBE = """\
from pathlib import Path

Path(__file__).with_suffix(".imported").touch()  # the import's side effect the tests look for

from modkit.scheduler.policies import FCFSPolicy


class Policy(FCFSPolicy):
    pass
"""
reply_decoder = msgspec.msgpack.Decoder(Reply | ErrorReply)
HANDSHAKE_OUTCOMES = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED,
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
)


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two policy modules whose import leaves ``<module>.imported`` beside them."""
    folder = tmp_path_factory.mktemp("probes")
    for name in ("intruder_policy", "signed_policy"):
        (folder / f"{name}.py").write_text(PROBE)
    return folder


@pytest.fixture(scope="module")
def pipeline(probes: Path) -> Iterator[Pipeline]:
    ports = free_tcp_ports(len(TCP_SOCKETS))  # all different
    overrides = {name: tcp_address(port) for name, port in zip(TCP_SOCKETS, ports, strict=True)}
    with pytest.MonkeyPatch.context() as env:  # the components can import the probes (if anything lets them)
        env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(probes), os.environ.get("PYTHONPATH")])))
        p = Pipeline.launch(
            ports="auto", num_workers=1, num_kv_blocks=48, api_key=API_KEY, addresses=overrides, progress=False
        )
    with p:
        yield p


def chat(p: Pipeline) -> str:
    reply = p.client(timeout=60).chat.completions.create(
        model=p.model_name, messages=QUESTION, max_tokens=16, temperature=0
    )
    return str(reply.choices[0].message.content)


# -- raw frames, as an attacker sends them -------------------------------------------------


def signed(call: Call, keys: LaunchKeys, sent_at: float | None = None) -> list[bytes]:
    """``[Call, MAC]`` as an RpcClient holding ``keys`` sends it."""
    frame = encode(Call(call.req_id, call.method, call.args, call.kwargs, sent_at or time.time(), os.urandom(16)))
    return [frame, mac(frame, keys)]


def raw_call(address: str, frames: list[bytes], timeout_s: float = 10.0) -> Reply | ErrorReply | None:
    """Send ``frames`` from a bare DEALER (no CURVE keys); the reply, or None if none came."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send_multipart(frames)
        if not sock.poll(round(timeout_s * 1000)):
            return None
        return reply_decoder.decode(sock.recv())
    finally:
        sock.close()


def attacks(component: str) -> list[Call]:
    """The state-changing calls an intruder would make on ``component``."""
    intruder = ImplSpec(import_path="intruder_policy:Policy")
    return {
        "scheduler": [Call(2, "hold_new_requests", [True]), Call(3, "swap", [intruder])],
        "kv_cache_manager": [
            Call(2, "apply", [0, [KVAdmit("intruder", [7] * 64, 0, 64)]]),
            Call(3, "swap", [intruder]),
        ],
        "sampler": [Call(2, "swap", [intruder])],
        "worker-0": [Call(2, "use_attention", [intruder])],
        "frontend": [Call(2, "drain")],
    }[component] + [Call(1, SHUTDOWN)]


def forgeries(call: Call, keys: LaunchKeys) -> dict[str, list[bytes]]:
    """``call`` unsigned, signed under another launch's key, tampered with after signing, and stale."""
    other = new_launch_keys()
    honest = signed(Call(call.req_id, "num_unfinished"), keys)
    return {
        "unsigned": [encode(call)],
        "signed under another key": signed(call, other),
        "a valid MAC of another call": [signed(call, other)[0], honest[1]],
        "stale": signed(call, keys, sent_at=time.time() - 3600),
    }


IPC_COMPONENTS = ("scheduler", "kv_cache_manager", "sampler", "worker-0", "frontend")


def test_forged_control_calls_are_refused_and_change_nothing(pipeline: Pipeline, probes: Path) -> None:
    before = {name: body.get("implementation") for name, body in pipeline.health().items()}
    pids = pipeline.pids()
    for component in IPC_COMPONENTS:
        address = pipeline.processes[component].address
        assert address.startswith("ipc://")
        for call in attacks(component):
            for how, frames in forgeries(call, pipeline.keys).items():
                reply = raw_call(address, frames)
                assert isinstance(reply, ErrorReply), (component, call.method, how, reply)
                assert reply.type_name == "PermissionError" and reply.req_id == call.req_id, (component, how, reply)
        ping = raw_call(address, [encode(Call(9, PING))])  # liveness stays open
        assert isinstance(ping, Reply) and ping.result["pid"] == pids[component]

    assert not (probes / "intruder_policy.imported").exists(), "an unsigned import_path swap imported its module"
    assert pipeline.pids() == pids and all(p.state() == "running" for p in pipeline.processes.values())
    assert {name: body.get("implementation") for name, body in pipeline.health().items()} == before
    kv_pool = pipeline.stats()["kv_cache_manager"]["pools"][0]
    assert kv_pool["num_requests_holding_blocks"] == 0, "the intruder's KVAdmit took blocks"
    assert chat(pipeline), "not held, not drained: requests still flow"


def test_a_replayed_signed_frame_is_refused(pipeline: Pipeline) -> None:
    address = pipeline.processes["scheduler"].address
    frames = signed(Call(5, "hold_new_requests", [False]), pipeline.keys)  # as an eavesdropper would copy it
    first = raw_call(address, frames)
    assert isinstance(first, Reply) and first.result["held"] == 0, "the launch's own signed call runs"
    again = raw_call(address, frames)
    assert isinstance(again, ErrorReply) and again.type_name == "PermissionError" and "replay" in again.message


def test_the_same_calls_through_the_pipeline_still_work(pipeline: Pipeline, probes: Path) -> None:
    assert pipeline.hold_requests(True) == 0
    assert pipeline.hold_requests(False) == 0
    assert pipeline.swap("scheduler", "sjf")["implementation"] == "sjf"
    swapped = pipeline.swap("scheduler", "signed_policy:Policy")  # a signed import_path swap does import
    assert swapped == {"implementation": "signed_policy:Policy", "previous": "sjf"}
    assert (probes / "signed_policy.imported").exists()
    assert pipeline.health()["scheduler"]["implementation"] == "signed_policy:Policy"


# -- CURVE on TCP --------------------------------------------------------------------------


def bare_socket(kind: int, address: str, keys: LaunchKeys | None = None) -> tuple[zmq.Socket[bytes], bool]:
    """A socket connected to ``address`` with no CURVE keys (or ``keys``' client pair), and whether its
    ZMTP handshake succeeded (False once it failed, or after 2 s without an outcome)."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_serverkey, sock.curve_publickey = keys.server_public.encode(), keys.client_public.encode()
        sock.curve_secretkey = keys.client_secret.encode()
    monitor = sock.get_monitor_socket()  # before connect, so the handshake's outcome is not missed
    sock.connect(address)
    try:
        deadline = time.monotonic() + 2.0
        while (remaining := deadline - time.monotonic()) > 0:
            if not monitor.poll(round(remaining * 1000)):
                continue
            event = recv_monitor_message(monitor)["event"]
            if event in HANDSHAKE_OUTCOMES:
                return sock, event == zmq.EVENT_HANDSHAKE_SUCCEEDED
        return sock, False
    finally:
        sock.disable_monitor()
        monitor.close()


def intruders(keys: LaunchKeys) -> list[LaunchKeys | None]:
    """No keys; another launch's; the server's public key (not secret in CURVE) with a client pair of one's own."""
    public, secret = (k.decode() for k in zmq.curve_keypair())
    return [None, new_launch_keys(), LaunchKeys("", keys.server_public, "", public, secret)]


def test_the_pipeline_serves_over_curve_tcp_as_the_engine_does(pipeline: Pipeline) -> None:
    params = SamplingParams(temperature=0, max_tokens=16)
    expected = LLM(num_kv_blocks=48).chat([QUESTION], params, use_tqdm=False)[0].outputs[0].text
    assert pipeline.addresses.inbox("scheduler").startswith("tcp://127.0.0.1:")
    with pipeline.events() as stream:
        assert chat(pipeline) == expected
        assert stream.recv(5) is not None, "the launch's own subscription hears events over CURVE"


@pytest.mark.parametrize(
    ("socket_name", "kind"),
    [("router.rpc", zmq.DEALER), ("scheduler.in", zmq.PUSH), ("frontend.in", zmq.PUSH), ("scheduler.ev", zmq.SUB)],
)
def test_a_socket_without_the_keys_cannot_connect_to_a_tcp_endpoint(
    pipeline: Pipeline, socket_name: str, kind: int
) -> None:
    address = pipeline.config.addresses[socket_name]  # type: ignore[index]
    for keys in intruders(pipeline.keys):
        sock, got_in = bare_socket(kind, address, keys)
        try:
            assert not got_in, f"a client without this launch's keys completed a handshake with {socket_name}"
            if kind == zmq.DEALER:
                with contextlib.suppress(zmq.Again):  # Again: no peer took it (a blocking send would wait for ever)
                    sock.send(encode(Call(1, PING)), zmq.NOBLOCK)
                assert not sock.poll(500), "a call without the keys got an answer"
        finally:
            sock.close()
    sock, got_in = bare_socket(kind, address, pipeline.keys)  # the control: with the launch's client key it does
    sock.close()
    assert got_in


def test_a_push_without_the_keys_never_reaches_a_curve_inbox() -> None:
    keys = new_launch_keys()
    inbox = Inbox(tcp_address(), keys=keys)
    try:
        for intruder_keys in intruders(keys):
            sock, got_in = bare_socket(zmq.PUSH, inbox.address, intruder_keys)
            assert not got_in
            with contextlib.suppress(zmq.Again):  # Again: no peer took it, as it should be
                sock.send(encode(AbortRequest(["forged"])), zmq.NOBLOCK)
            sock.close()
        outbox = Outbox(inbox.address, keys=keys)
        outbox.send(AbortRequest(["genuine"]))
        arrived: list[Any] = []

        def received(count: int) -> bool:
            arrived.extend(inbox.drain())
            return len(arrived) >= count

        assert wait_until(lambda: received(1), 5), "the launch's own message arrives"
        assert not wait_until(lambda: received(2), 1), f"a forged message arrived: {arrived}"
        assert arrived == [AbortRequest(["genuine"])]
        outbox.close()
    finally:
        inbox.close()


# -- the component HTTP ports --------------------------------------------------------------


def http_status(url: str, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        body: dict[str, Any] = msgspec.json.decode(error.read())
        assert error.code != 401 or body["error"]["code"] == "invalid_api_key", body
        return int(error.code)


def test_stats_asks_for_the_api_key_and_health_stays_open(pipeline: Pipeline) -> None:
    for name, health_url in pipeline.urls().items():
        if name == "frontend":  # the frontend's own app (tests/faults/test_inputs.py)
            continue
        stats_url = health_url.removesuffix("/health") + "/stats"
        assert http_status(health_url) == 200, name
        assert http_status(stats_url) == 401, name
        assert http_status(stats_url, "sk-wrong") == 401, name
        assert http_status(stats_url, API_KEY) == 200, name
    assert all(body["http_status"] == 200 for body in pipeline.stats().values())
