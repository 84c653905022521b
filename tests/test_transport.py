"""The ZeroMQ transport: RPC, pub/sub and component processes, with real processes and sockets.

The objects served in child processes are in tests/transport_targets.py. Every wait is
bounded; the module fixture starts one child that most tests share.
"""

from __future__ import annotations

import os
import pstats
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq
from transport_targets import Echo, Pair, Point
from waiting import wait_until

from modkit.protocol import LOOP, Call, ErrorReply, Reply
from modkit.transport import (
    QUIET_THREADS,
    ComponentProcess,
    ComponentStartError,
    InsecureAddressError,
    Publisher,
    RemoteError,
    RpcClient,
    RpcServer,
    RpcTimeoutError,
    Subscriber,
    check_bind_address,
    decode,
    encode,
    free_tcp_ports,
    tcp_address,
)
from modkit.transport.addresses import ipc_path
from modkit.transport.security import new_launch_keys

pytestmark = pytest.mark.timeout(60)

TESTS_DIR = Path(__file__).resolve().parent
PYTHONPATH = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
CHILD_ENV = {"PYTHONPATH": PYTHONPATH, **QUIET_THREADS}  # the child imports transport_targets


def start_echo(name: str, log_dir: Path, address: str | None = None) -> ComponentProcess:
    return ComponentProcess.start(
        name,
        "transport_targets:Echo",
        {"greeting": "hi", "origin": Point(5, 6)},
        address,
        env=CHILD_ENV,
        log_dir=log_dir,
        ready_timeout_s=30,
        heartbeat_interval_s=0.1,
        heartbeat_timeout_s=1.0,
    )


def process_gone(pid: int) -> bool:
    """No such process, or only a zombie left for its (possibly non-reaping) new parent."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return True
    return state in ("Z", "X")


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComponentProcess]:
    proc = start_echo("echo", tmp_path_factory.mktemp("logs"))
    yield proc
    proc.stop()


@pytest.mark.slow
def test_child_answers_over_ipc_and_is_ready(echo: ComponentProcess) -> None:
    assert echo.address.startswith("ipc://")
    with echo.client() as client:
        assert client.call("pid") == echo.pid  # READY named the process that serves
        assert client.call("greet", "ada") == "hi, ada"
        assert client.call("echo", {"a": [1, 2.5, None, b"\x00"]}) == {"a": [1, 2.5, None, b"\x00"]}
        assert client.ping()["pid"] == echo.pid
        # Struct and dataclass arguments are rebuilt from the method's annotations; proxy converts results.
        assert client.proxy(Echo).shift(Point(1, 2), Pair(10, 20)) == Point(11, 22)
        assert client.call("get_origin") == {"x": 5, "y": 6}  # plain call(): the Struct arrives as a dict
        assert client.proxy(Echo).get_origin() == Point(5, 6)
    assert wait_until(echo.is_alive, 5)
    assert echo.state() == "running" and "echo ready" in echo.log_tail()


def test_free_tcp_ports_are_all_different_and_each_can_be_bound() -> None:
    """Picked one at a time, a port let go may come back at once; ``free_tcp_ports`` holds each
    until all are picked, so a launch given them never finds two sockets on one port."""
    ports = free_tcp_ports(64)
    assert len(set(ports)) == 64
    context = zmq.Context.instance()
    sockets = [context.socket(zmq.PULL) for _ in ports]
    try:
        for sock, port in zip(sockets, ports, strict=True):
            sock.bind(tcp_address(port))  # all at once: none taken by another
    finally:
        for sock in sockets:
            sock.close(linger=0)


@pytest.mark.slow
def test_child_answers_over_tcp_and_stops_politely(tmp_path: Path) -> None:
    proc = start_echo("echo-tcp", tmp_path, tcp_address())
    try:
        assert proc.address.startswith("tcp://127.0.0.1:") and not proc.address.endswith(":*")
        with proc.client() as client:
            assert client.call("greet", "tcp") == "hi, tcp"
    finally:
        assert proc.stop() == 0  # the SHUTDOWN call was enough
    assert process_gone(proc.pid) and proc.state() == "exited"
    control_file = ipc_path(proc.spec.control_address)
    assert control_file is not None and list(control_file.parent.glob("echo-tcp*")) == []


@pytest.mark.slow
def test_remote_error_then_next_call_succeeds(echo: ComponentProcess) -> None:
    with echo.client() as client:
        with pytest.raises(RemoteError) as caught:
            client.call("fail", "boom")
        assert caught.value.type_name == "ValueError" and caught.value.message == "boom"
        assert "raise ValueError(message)" in caught.value.remote_traceback
        for method, args, type_name in [
            ("_secret", (), "PermissionError"),
            ("no_such_method", (), "AttributeError"),
            ("greet", (), "TypeError"),  # missing argument
            ("shift", ({"x": "not an int", "y": 0}, {"left": 0, "right": 0}), "TypeError"),
        ]:
            with pytest.raises(RemoteError, match=type_name):
                client.call(method, *args)
        with pytest.raises(TypeError):  # not msgpack-able: refused before anything is sent
            client.call("echo", object())
        assert client.call("echo", "still serving") == "still serving"


def test_allowed_methods_and_serve_forever_in_a_thread(tmp_path: Path) -> None:
    stop = threading.Event()
    with RpcServer(Echo(), f"ipc://{tmp_path}/allow", allowed_methods=["echo"]) as server:
        thread = threading.Thread(target=server.serve_forever, args=(stop,))
        thread.start()
        try:
            with RpcClient(server.address, timeout_s=5) as client:
                assert client.call("echo", 3) == 3
                with pytest.raises(RemoteError, match="PermissionError"):
                    client.call("greet", "x")
        finally:
            stop.set()
            thread.join(5)
        assert not thread.is_alive()
    with pytest.raises(ValueError, match="_secret"):
        RpcServer(Echo(), f"ipc://{tmp_path}/allow2", allowed_methods=["_secret"])


class Tally:
    """Counts the values it is given (in the server's thread)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def add(self, value: int) -> int:
        self.seen.append(value)
        return len(self.seen)

    def count(self) -> int:
        return len(self.seen)


def test_notify_runs_a_call_without_waiting_and_the_next_call_gets_its_own_reply(tmp_path: Path) -> None:
    tally, stop = Tally(), threading.Event()
    with RpcServer(tally, f"ipc://{tmp_path}/notify") as server:
        thread = threading.Thread(target=server.serve_forever, args=(stop,))
        thread.start()
        try:
            with RpcClient(server.address, timeout_s=5) as client:
                client.notify("add", 7)  # returns before the server has run it: its reply (1) comes later
                client.notify("add", 8)
                assert wait_until(lambda: tally.seen == [7, 8], 5)
                assert client.call("count") == 2  # not the stale reply of a notify
                assert client.call("add", 9) == 3
        finally:
            stop.set()
            thread.join(5)


def test_a_server_with_keys_serves_only_signed_calls_and_liveness(tmp_path: Path) -> None:
    keys, stop = new_launch_keys(), threading.Event()
    with RpcServer(Echo(), f"ipc://{tmp_path}/signed", keys=keys) as server:
        thread = threading.Thread(target=server.serve_forever, args=(stop,))
        thread.start()
        try:
            with RpcClient(server.address, timeout_s=5, keys=keys) as client:
                assert client.call("greet", "ada") == "hello, ada"
            for other in (None, new_launch_keys()):  # unsigned; signed under another launch's key
                with RpcClient(server.address, timeout_s=5, keys=other) as client:
                    with pytest.raises(RemoteError, match="PermissionError"):
                        client.call("greet", "eve")
                    assert client.ping()["object"] == "Echo"  # liveness stays open
        finally:
            stop.set()
            thread.join(5)


def test_tcp_needs_the_launchs_curve_keys_and_beyond_loopback_keys_at_all() -> None:
    with pytest.raises(InsecureAddressError, match="CURVE"):
        RpcServer(Echo(), "tcp://0.0.0.0:0", allow_remote=True)  # allowed beyond loopback, but in the clear: no
    keys, stop = new_launch_keys(), threading.Event()
    with RpcServer(Echo(), "tcp://127.0.0.1:0", keys=keys) as server:
        thread = threading.Thread(target=server.serve_forever, args=(stop,))
        thread.start()
        try:
            with RpcClient(server.address, timeout_s=5, keys=keys) as client:
                assert client.call("greet", "ada") == "hello, ada"
            for other in (None, new_launch_keys()):  # no CURVE keys; another launch's: no handshake, no reply
                with RpcClient(server.address, timeout_s=0.5, keys=other) as client, pytest.raises(RpcTimeoutError):
                    client.ping()
        finally:
            stop.set()
            thread.join(5)


@pytest.mark.slow
def test_garbage_frames_do_not_kill_the_server(echo: ComponentProcess) -> None:
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(echo.address)
    try:
        raw.send(b"\xc1 not msgpack at all")  # dropped and logged
        raw.send_multipart([b"three", b"frames", b"here"])  # not [identity, call]: dropped
        raw.send(encode(Reply(5, "a reply is not a call")))  # dropped
        raw.send(msgspec.msgpack.encode({"type": "bogus", "req_id": 77}))  # unknown tag, but answerable
        assert raw.poll(5000, zmq.POLLIN)
        answer = decode(raw.recv())
        assert isinstance(answer, ErrorReply) and answer.req_id == 77 and answer.type_name == "DecodeError"
    finally:
        raw.close()
    with echo.client() as client:
        assert client.call("echo", "alive") == "alive"


@pytest.mark.slow
def test_timeout_then_late_reply_is_not_returned_to_the_next_call(echo: ComponentProcess) -> None:
    with echo.client(timeout_s=10) as client:
        started = time.monotonic()
        with pytest.raises(RpcTimeoutError, match=r"'sleep'.*ipc://"):
            client.invoke("sleep", (1.0, "late"), timeout_s=0.3)
        assert 0.3 <= time.monotonic() - started < 0.3 + 0.5
        assert client.call("echo", "next") == "next"  # waits out the sleep; "late" must not show up


def test_timeout_when_nobody_listens(tmp_path: Path) -> None:
    with RpcClient(f"ipc://{tmp_path}/nobody", timeout_s=0.2) as client:
        started = time.monotonic()
        with pytest.raises(RpcTimeoutError):
            client.call("anything")
        assert time.monotonic() - started < 0.2 + 0.5


def test_replies_with_other_request_ids_are_discarded(tmp_path: Path) -> None:
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(f"ipc://{tmp_path}/stale")

    def answer_once() -> None:  # a stale reply and a garbage one before the real one
        if router.poll(5000, zmq.POLLIN):
            identity, frame = router.recv_multipart()
            call = decode(frame)
            assert isinstance(call, Call)
            router.send_multipart([identity, encode(Reply(call.req_id + 1000, "stale"))])
            router.send_multipart([identity, b"\xc1"])
            router.send_multipart([identity, encode(Reply(call.req_id, "fresh"))])

    thread = threading.Thread(target=answer_once)
    thread.start()
    try:
        with RpcClient(f"ipc://{tmp_path}/stale", timeout_s=5) as client:
            assert client.call("anything") == "fresh"
    finally:
        thread.join(5)
        router.close()


def test_binding_beyond_loopback_is_refused(tmp_path: Path) -> None:
    for address in ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://[::]:5555", "tcp://192.168.1.7:5555", "tcp://eth0:1"]:
        with pytest.raises(InsecureAddressError):
            check_bind_address(address)
    with pytest.raises(InsecureAddressError):
        RpcServer(Echo(), "tcp://0.0.0.0:0")
    with pytest.raises(InsecureAddressError):
        Publisher("tcp://*:0")
    with pytest.raises(InsecureAddressError):
        ComponentProcess.start("remote", "transport_targets:Echo", address="tcp://0.0.0.0:0", log_dir=tmp_path)
    assert check_bind_address("tcp://0.0.0.0:5555", allow_remote=True) == "tcp://0.0.0.0:5555"
    for address in ["tcp://127.0.0.1:5555", "tcp://[::1]:5555", "tcp://localhost:1", "ipc:///tmp/x", "inproc://x"]:
        assert check_bind_address(address) == address
    with pytest.raises(ValueError, match="unsupported"):
        check_bind_address("udp://127.0.0.1:1")


def subscribed(publisher: Publisher, subscriber: Subscriber) -> bool:
    """Publish on a warm-up topic until the subscriber hears it (messages before that are lost)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        publisher.publish("kv.hello", None)
        if subscriber.recv(0.05) is not None:
            while subscriber.recv(0.05) is not None:
                pass
            return True
    return False


def test_pubsub_delivers_in_order_with_seq(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/events"
    with Publisher(address) as publisher, Subscriber(address, topics=["kv"]) as subscriber:
        assert subscribed(publisher, subscriber)
        for i in range(100):
            publisher.publish("kv", {"i": i})
            publisher.publish("other", i)  # not subscribed: never delivered
        received = [subscriber.recv(2.0) for _ in range(100)]
        assert [(d.topic, d.seq, d.payload) for d in received if d] == [("kv", i, {"i": i}) for i in range(100)]
        assert subscriber.missed == 0 and subscriber.recv(0.1) is None


def test_subscriber_reports_what_pub_dropped_at_the_high_water_mark(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/flood"
    with Publisher(address, hwm=10) as publisher, Subscriber(address, topics=["kv"], hwm=10) as subscriber:
        assert subscribed(publisher, subscriber)
        blob = bytes(64 * 1024)
        for _ in range(500):  # 32 MB nobody reads meanwhile: far beyond the queues
            publisher.publish("kv", blob)
        seqs = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # read until a marker sent after the flood gets through
            delivery = subscriber.recv(0.2)
            if delivery is None:
                publisher.publish("kv", b"end")
            elif delivery.topic == "kv":
                seqs.append(delivery.seq)
                if delivery.payload == b"end":
                    break
        assert seqs == sorted(seqs) and seqs[-1] >= 500
        assert subscriber.missed > 0 and len(seqs) + subscriber.missed == seqs[-1] + 1
        assert subscriber.lost("kv") == subscriber.missed  # the first one came: every loss is a gap


def test_subscriber_counts_what_was_sent_before_its_subscription_as_lost(tmp_path: Path) -> None:
    """The slow joiner: no gap shows what a topic sent before the first message that arrived, its seq does."""
    address = f"ipc://{tmp_path}/late"
    with Publisher(address) as publisher:
        for i in range(5):  # nobody subscribes yet: the publisher drops them
            publisher.publish("kv", i)
        with Subscriber(address, topics=["kv"]) as subscriber:
            deadline = time.monotonic() + 5
            while not publisher.wants("kv"):  # the subscription reached the publisher
                assert time.monotonic() < deadline, "the subscription never arrived"
                time.sleep(0.01)
            for i in range(5, 8):
                publisher.publish("kv", i)
            received = [subscriber.recv(2.0) for _ in range(3)]
            assert [(d.seq, d.payload) for d in received if d] == [(5, 5), (6, 6), (7, 7)]
            assert subscriber.missed == 0 and subscriber.received == {"kv": 3} and subscriber.lost("kv") == 5
            assert subscriber.lost("other") == 0  # a topic it never heard of: nothing known lost


def test_subscriber_counts_a_restarted_publisher_from_its_new_seq(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/restarts"
    with Subscriber(address, topics=["kv"]) as subscriber:
        with Publisher(address) as first:
            assert subscribed(first, subscriber)
            for i in range(3):
                first.publish("kv", i)
            assert [d.seq for d in (subscriber.recv(2.0) for _ in range(3)) if d] == [0, 1, 2]
        with Publisher(address) as second:  # the same address: the subscriber reconnects to it
            assert subscribed(second, subscriber)
            second.publish("kv", "again")
            delivery = subscriber.recv(2.0)
            assert delivery is not None and (delivery.seq, delivery.payload) == (0, "again")
            assert subscriber.received["kv"] == 1 and subscriber.lost("kv") == 0


def test_publisher_knows_which_topics_anyone_subscribes_to(tmp_path: Path) -> None:
    """XPUB: ``wants`` follows subscriptions as they come and go, by prefix; what it refuses, a SUB never gets."""
    address = f"ipc://{tmp_path}/wanted"
    with Publisher(address) as publisher:
        assert not publisher.wants("step.0"), "nobody subscribes yet"
        with Subscriber(address, topics=["step."]) as steps:
            assert wait_until(lambda: publisher.wants("step.0"), 5), "the subscription never arrived"
            assert publisher.wants("step.1") and not publisher.wants("forward.0") and not publisher.wants("step")
            with Subscriber(address, topics=[""]):
                assert wait_until(lambda: publisher.wants("forward.0"), 5)
            assert wait_until(lambda: not publisher.wants("forward.0"), 5), "the catch-all left: forward.0 is unwanted"
            assert publisher.wants("step.0"), "step. is still held"
            publisher.publish("forward.0", "dropped")  # what wants() says nobody gets: ZeroMQ drops it too
            publisher.publish("step.0", "delivered")
            delivery = steps.recv(2.0)
            assert delivery is not None and (delivery.topic, delivery.payload) == ("step.0", "delivered")
        assert wait_until(lambda: not publisher.wants("step.0"), 5), "the last subscriber left"


@pytest.mark.slow
def test_serve_loop_clock_tells_busy_from_idle(echo: ComponentProcess) -> None:
    """The loop's own clock: a call that keeps it busy half a second counts as busy, a quiet half second as idle."""
    with echo.client(timeout_s=10) as client:
        before = client.call(LOOP)
        client.call("sleep", 0.5)
        time.sleep(0.5)
        after = client.call(LOOP)
    busy, idle = after["busy_s"] - before["busy_s"], after["idle_s"] - before["idle_s"]
    elapsed = after["elapsed_s"] - before["elapsed_s"]
    assert 0.5 <= busy < 0.75, busy
    assert 0.35 < idle <= elapsed - 0.5, (idle, elapsed)
    assert after["busy_s"] + after["idle_s"] == pytest.approx(after["elapsed_s"])
    assert 0 < after["busy_fraction"] < 1 and after["num_turns"] > before["num_turns"]


@pytest.mark.slow
def test_heartbeats_tell_busy_from_dead(echo: ComponentProcess) -> None:
    assert wait_until(lambda: echo.heartbeat_age() < 0.5, 5)

    def sleep_in_the_child() -> None:
        with echo.client(timeout_s=10) as client:
            client.call("sleep", 2.0)

    busy = threading.Thread(target=sleep_in_the_child)
    busy.start()
    try:
        assert wait_until(lambda: echo.state() == "unresponsive", 1.9)  # alive, but its loop is in a call
        assert not echo.is_alive() and echo.returncode is None
    finally:
        busy.join(10)
    assert wait_until(lambda: echo.state() == "running", 5)


@pytest.mark.slow
def test_start_failure_raises_with_the_childs_stderr(tmp_path: Path) -> None:
    with pytest.raises(ComponentStartError, match=r"exited with code 1(.|\n)*No module named 'no_such_module'"):
        ComponentProcess.start("broken", "no_such_module:Thing", env=CHILD_ENV, log_dir=tmp_path, ready_timeout_s=30)
    with pytest.raises(ValueError, match=r"package\.module:Name"):
        ComponentProcess.start("broken", "no_colon_here", log_dir=tmp_path)


@pytest.mark.slow
def test_stop_escalates_to_sigterm_and_leaves_no_process_or_socket_file(tmp_path: Path) -> None:
    proc = start_echo("stuck", tmp_path)
    files = [ipc_path(a) for a in (proc.address, proc.spec.control_address, proc.spec.heartbeat_address)]
    assert all(path is not None and path.exists() for path in files)
    with proc.client() as client, pytest.raises(RpcTimeoutError):
        client.invoke("sleep", (30,), timeout_s=0.2)  # now busy for 30 s: the SHUTDOWN call goes unanswered
    started = time.monotonic()
    assert proc.stop(timeout_s=1.5) == 128 + signal.SIGTERM  # torch's own exit takes ~0.6 s here
    assert time.monotonic() - started < 1.5 + 1.5 + 1
    assert process_gone(proc.pid)
    assert not any(path is not None and path.exists() for path in files)
    assert proc.log_path.exists()


HELPER = """
import sys, time
from pathlib import Path
from modkit.transport import ComponentProcess, run_dir
env = {"PYTHONPATH": sys.argv[1]}
proc = ComponentProcess.start("orphan", "transport_targets:Echo", env=env, log_dir=Path(sys.argv[2]),
                              heartbeat_interval_s=0.1, ready_timeout_s=30)
print(proc.pid, run_dir(), flush=True)
time.sleep(60)
"""


@pytest.mark.slow
def test_component_exits_when_its_launcher_is_killed(tmp_path: Path) -> None:
    helper = subprocess.Popen(
        [sys.executable, "-c", HELPER, CHILD_ENV["PYTHONPATH"], str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    child_pid, run_dir = None, None
    try:
        assert helper.stdout is not None
        ready, _, _ = select.select([helper.stdout], [], [], 45)
        assert ready, "the helper did not start its component in time"
        pid_text, run_dir = helper.stdout.readline().split()
        child_pid = int(pid_text)
        assert not process_gone(child_pid)
        helper.send_signal(signal.SIGKILL)
        helper.wait(5)
        assert wait_until(lambda: process_gone(child_pid), 5), "the orphaned component kept running"
        assert "exiting" in (tmp_path / "orphan.log").read_text()  # it left by itself, nobody killed it
    finally:
        helper.kill()
        if child_pid is not None and not process_gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.slow
def test_profile_dir_leaves_a_profile_per_serve_loop(tmp_path: Path) -> None:
    """MODKIT_PROFILE_DIR: the child's serve loop runs under cProfile, and profile_pipeline.py reads it."""
    profiles = tmp_path / "prof"
    proc = ComponentProcess.start(
        "echo-prof",
        "transport_targets:Echo",
        {"greeting": "hi", "origin": Point(5, 6)},
        env={**CHILD_ENV, "MODKIT_PROFILE_DIR": str(profiles)},
        log_dir=tmp_path,
        ready_timeout_s=30,
    )
    try:
        with proc.client() as client:
            for i in range(20):
                assert client.call("greet", str(i)) == f"hi, {i}"
    finally:
        assert proc.stop() == 0
    files = list(profiles.glob("Echo-*.prof"))
    assert len(files) == 1, f"one profile, from the Echo loop: {files}"
    script = Path(__file__).parents[1] / "scripts" / "profile_pipeline.py"
    summary = subprocess.run([sys.executable, str(script), str(profiles)], capture_output=True, text=True, check=True)
    assert "Echo-" in summary.stdout and "idle (waiting for messages)" in summary.stdout
    calls = {name: row[1] for (_, _, name), row in pstats.Stats(str(files[0])).stats.items()}  # type: ignore[attr-defined]
    assert calls["greet"] == 20, "the profile saw every call the loop served"
