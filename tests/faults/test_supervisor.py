"""The supervisor restarts what dies; a launch sweeps what dead launches left; directories are private.

Two pipelines, each shared by the tests that follow it (they run in file order):

- ``scripts/start_all.py`` with one worker, in a subprocess: its worker SIGKILLed under
  streaming traffic (every stream gets an error within 5 s, the worker comes back and serves
  the oracle's text), its frontend SIGKILLed (start_all says so; the frontend comes back),
  then start_all itself SIGKILLed (every child exits; the next launch removes its socket
  directory);
- ``Pipeline.launch`` with two workers: the directories a launch sweeps and keeps, modes
  0700/0600, a worker SIGKILLed under streaming traffic (every stream moves and finishes
  with the oracle's text, no gap over 5 s), a hung component, and the restart limit.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from waiting import pid_exists, wait_until

from modkit import LLM, Pipeline, SamplingParams
from modkit.config import ConfigError, PipelineConfig
from modkit.frontend import EMBEDDED_MODEL_NAME
from modkit.transport.process import default_log_dir
from modkit.transport.rundirs import OWNER_FILE, process_start_time

ROOT = Path(__file__).resolve().parents[2]
KILL_TOKENS = 160
PROMPTS = ["Hello!", "What does a cow say?", "Who are you?", "Tell me about the number 7."]
PARAMS = SamplingParams(temperature=0, max_tokens=KILL_TOKENS, ignore_eos=True)


# -- helpers --------------------------------------------------------------------------------


@dataclass
class Streamed:
    """One streamed chat completion: its text, the error event if one came, and when each event came."""

    text: str = ""
    error: dict[str, object] | None = None
    times: list[float] = field(default_factory=list)


def stream_chat(
    url: str, prompt: str, max_tokens: int = KILL_TOKENS, started: threading.Event | None = None
) -> Streamed:
    """``started``, if given, is set once the stream's first event has reached this client."""
    body = {
        "model": EMBEDDED_MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    out, parts = Streamed(), []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            out.times.append(time.monotonic())
            if started is not None:
                started.set()
            if line == "data: [DONE]":
                break
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                out.error = chunk["error"]
            else:
                parts += [c["delta"].get("content") or "" for c in chunk["choices"]]
    out.text = "".join(parts)
    return out


def chat(url: str, prompt: str, max_tokens: int = 12) -> str:
    body: dict[str, object] = {"model": EMBEDDED_MODEL_NAME, "messages": [{"role": "user", "content": prompt}]}
    body |= {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


def get_json(url: str) -> dict[str, object]:
    try:
        reply = httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return {"status": "unreachable"}
    return {**reply.json(), "http_status": reply.status_code}


def dirs_of_launcher(pid: int) -> list[Path]:
    """The temporary directories whose owner file names ``pid``."""
    found = []
    for path in Path(tempfile.gettempdir()).glob("modkit-*"):
        try:
            if json.loads((path / OWNER_FILE).read_text())["pid"] == pid:
                found.append(path)
        except (OSError, ValueError, KeyError):
            continue
    return found


def no_gap_over(stream: Streamed, killed_at: float, limit_s: float) -> bool:
    """After the kill, the stream's next event (a token, an error or its end) came within ``limit_s``,
    and so did every one after it."""
    after = [t for t in stream.times if t > killed_at]
    if not after:
        return True  # it had ended before the kill
    gaps = [after[0] - killed_at] + [b - a for a, b in itertools.pairwise(after)]
    return max(gaps) < limit_s


@pytest.fixture(scope="module")
def oracle() -> dict[str, str]:
    """What the in-process engine answers to each prompt, greedy: what every pipeline must answer."""
    llm = LLM(num_kv_blocks=256)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    outputs = llm.chat(conversations, PARAMS, use_tqdm=False)
    short_params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    short = llm.chat([[{"role": "user", "content": "Hello!"}]], short_params, use_tqdm=False)
    return {**{p: o.outputs[0].text for p, o in zip(PROMPTS, outputs, strict=True)}, "short": short[0].outputs[0].text}


# -- start_all with one worker -------------------------------------------------------------


@dataclass
class StartAll:
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    urls: dict[str, str]  # component -> its base URL
    pids: dict[str, int]  # component -> the pid it started with

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def pids_now(self) -> dict[str, int]:
        """Every pid start_all reported, restarted components included (the newest per name)."""
        found = re.findall(r"supervisor: (\S+) is back \(pid (\d+)", self.stderr())
        return {**self.pids, **{name: int(pid) for name, pid in found}}


@pytest.fixture(scope="module")
def start_all(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartAll]:
    folder = tmp_path_factory.mktemp("start_all")
    out, err = folder / "stdout.txt", folder / "stderr.txt"
    command = [sys.executable, str(ROOT / "scripts" / "start_all.py"), "--ports", "auto", "--num-kv-blocks", "128"]
    command += ["--restart-backoff-s", "0.2", "--log-dir", str(folder / "logs")]
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(command, stdout=o, stderr=e, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        served = wait_until(lambda: "serving" in out.read_text() or proc.poll() is not None, 180)
        assert served and proc.poll() is None, f"start_all did not serve:\n{out.read_text()}\n{err.read_text()}"
        urls = dict(re.findall(r"^  (\S+)\s+(http://\S+)/health$", out.read_text(), re.MULTILINE))
        pids = {name: int(pid) for name, pid in re.findall(r"^(\S+) ready in .* \(pid (\d+)\)", err.read_text(), re.M)}
        yield StartAll(proc, out, err, urls, pids)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def test_the_only_worker_killed_mid_stream(start_all: StartAll, oracle: dict[str, str]) -> None:
    """Every stream gets an error within 5 s; the frontend says degraded meanwhile; the supervisor
    brings the worker back and it serves the oracle's text."""
    url, scheduler = start_all.urls["frontend"], start_all.urls["scheduler"]
    # On a loaded machine the router may miss heartbeats for a while: start when it sees the worker.
    assert wait_until(lambda: get_json(f"{start_all.urls['router']}/health").get("workers_alive") == [0], 30)
    started = [threading.Event() for _ in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        streams = [pool.submit(stream_chat, url, p, KILL_TOKENS, s) for p, s in zip(PROMPTS, started, strict=True)]

        def all_running() -> bool:
            worker = get_json(f"{scheduler}/stats")["workers"][0]  # type: ignore[index]
            return bool(worker["num_requests_running"] == len(PROMPTS) and worker["num_steps"] > 2)

        assert wait_until(all_running, 60), "the streams never ran on the worker"
        # Mid-stream for the clients too: a request whose first tokens had not reached the frontend
        # when its worker died is answered 503 instead of a stream that ends in an error event.
        assert wait_until(lambda: all(s.is_set() for s in started), 60), "a stream never began"
        os.kill(start_all.pids["worker-0"], signal.SIGKILL)
        killed_at = time.monotonic()
        down = wait_until(lambda: get_json(f"{url}/health").get("down") == ["worker-0"], 5)
        results = [s.result(timeout=60) for s in streams]
    assert down, "the frontend's /health never named worker-0 as down"
    for result in results:
        assert result.error is not None and result.times[-1] - killed_at < 5.0, result
    health = get_json(f"{url}/health")
    assert health["status"] in ("degraded", "ok"), health
    assert wait_until(lambda: get_json(f"{url}/health")["status"] == "ok", 120), start_all.stderr()
    assert "supervisor: worker-0 exited with code -9; restarting it (1 of 5 in 300 s)" in start_all.stderr()
    assert "worker-0 is back" in start_all.stderr()
    assert "degraded: worker-0 restarting" in start_all.stdout()
    assert wait_until(lambda: "serving again" in start_all.stdout(), 5), start_all.stdout()
    assert chat(url, "Hello!") == oracle["short"]
    assert stream_chat(url, PROMPTS[0]).text == oracle[PROMPTS[0]]


def test_the_frontend_killed(start_all: StartAll, oracle: dict[str, str]) -> None:
    """start_all says the API is down (not "serving"); the others stay healthy; the frontend comes back."""
    url = start_all.urls["frontend"]
    old = get_json(f"{url}/health")["pid"]
    os.kill(int(str(old)), signal.SIGKILL)
    said = "degraded: frontend restarting (the API does not answer)"
    assert wait_until(lambda: said in start_all.stdout(), 10), start_all.stdout()
    others = {name: get_json(f"{u}/health") for name, u in start_all.urls.items() if name != "frontend"}
    assert {name: h["status"] for name, h in others.items()} == dict.fromkeys(others, "ok"), others
    assert wait_until(lambda: get_json(f"{url}/health").get("status") == "ok", 120), start_all.stderr()
    assert get_json(f"{url}/health")["pid"] != old
    assert wait_until(lambda: start_all.stdout().count("serving again") == 2, 15), start_all.stdout()
    assert chat(url, "Hello!") == oracle["short"]


def test_start_all_sigkilled_leaves_nothing_running_and_the_next_launch_sweeps(
    start_all: StartAll, request: pytest.FixtureRequest
) -> None:
    children = start_all.pids_now()
    children["frontend"] = int(str(get_json(f"{start_all.urls['frontend']}/health")["pid"]))
    made = dirs_of_launcher(start_all.proc.pid)
    left = [d for d in made if not d.name.startswith("modkit-logs-")]  # its socket directories
    assert len(left) == 2, made  # the pipeline's, and its control sockets' (run_dir)
    assert {oct(d.stat().st_mode & 0o777) for d in [*made, start_all.out.parent / "logs"]} == {"0o700"}
    start_all.proc.kill()
    start_all.proc.wait()
    assert wait_until(lambda: not any(pid_exists(p) for p in children.values()), 10), {
        name: pid for name, pid in children.items() if pid_exists(pid)
    }
    assert all(d.exists() for d in left), "a SIGKILLed launcher cannot remove its socket directories"
    request.getfixturevalue("pipeline")  # the next launch
    assert [d for d in left if d.exists()] == [], "the next launch removes the dead launcher's socket directories"


# -- Pipeline.launch with two workers -------------------------------------------------------


@dataclass
class Planted:
    """Directories made before the launch, each as a dead or live launch would leave it."""

    swept: list[Path]
    kept: list[Path]


def plant_dirs() -> Planted:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names no process now

    def made(prefix: str, pid: int | None, start_time: int | None, age_s: float = 0.0) -> Path:
        path = Path(tempfile.mkdtemp(prefix=prefix))
        if pid is not None:
            (path / OWNER_FILE).write_text(json.dumps({"pid": pid, "start_time": start_time}))
        (path / "some.log").write_text("a line\n")
        if age_s:
            then = time.time() - age_s
            for p in (path / "some.log", path / OWNER_FILE, path):
                if p.exists():
                    os.utime(p, (then, then))
        return path

    me = os.getpid()
    return Planted(
        swept=[
            made("modkit-ipc-test-", dead.pid, 1),
            made("modkit-test-", dead.pid, 1),  # a run_dir of control sockets
            made("modkit-ipc-test-", me, (process_start_time(me) or 0) + 1),  # the pid was reused since
            made("modkit-logs-test-", dead.pid, 1, age_s=2 * 24 * 3600),
        ],
        kept=[
            made("modkit-ipc-test-", me, process_start_time(me)),  # a live launcher (this process)
            made("modkit-logs-test-", dead.pid, 1),  # a crash's logs, an hour old at most: kept a day
            made("modkit-ipc-test-", None, None),  # no owner file: not made by a launch
        ],
    )


@dataclass
class Launched:
    p: Pipeline
    planted: Planted
    log_dir: Path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    planted = plant_dirs()
    log_dir = tmp_path_factory.mktemp("logs") / "made" / "here"
    try:
        with Pipeline.launch(
            ports="auto",
            num_workers=2,
            num_kv_blocks=256,
            max_model_len=512,
            router_policy="round_robin",
            max_restarts=2,
            restart_backoff_s=0.2,
            restart_unresponsive_after_s=12.0,  # short, for the hung test; long enough for a loaded machine
            log_dir=str(log_dir),
            progress=False,
        ) as p:
            yield Launched(p, planted, log_dir)
    finally:
        for path in planted.kept:
            subprocess.run(["rm", "-rf", str(path)], check=False)


def test_a_launch_sweeps_only_the_directories_of_dead_launches(pipeline: Launched) -> None:
    assert [p for p in pipeline.planted.swept if p.exists()] == []
    assert [p for p in pipeline.planted.kept if not p.exists()] == []


def test_every_directory_made_is_private(pipeline: Launched) -> None:
    p = pipeline.p
    assert p.processes["sampler"].log_path.parent == pipeline.log_dir
    temporary = [Path(p.addresses.ipc_dir), default_log_dir()]
    temporary += [Path(p.processes["sampler"].spec.control_address.removeprefix("ipc://")).parent]  # run_dir
    made = [pipeline.log_dir, pipeline.log_dir.parent, *temporary]
    assert {str(d): oct(d.stat().st_mode & 0o777) for d in made} == {str(d): "0o700" for d in made}
    logs = list(pipeline.log_dir.iterdir())
    assert logs and {f.name: oct(f.stat().st_mode & 0o777) for f in logs} == {f.name: "0o600" for f in logs}
    for d in temporary:  # each names its launcher, for the sweep
        assert json.loads((d / OWNER_FILE).read_text())["pid"] == os.getpid()


def what_runs(p: Pipeline) -> str:
    """What the router and scheduler think, and their last log lines: for a test that timed out."""
    health, stats = p.health(), p.stats()
    workers = [{k: w[k] for k in ("num_requests_running", "num_steps")} for w in stats["scheduler"]["workers"]]
    return (
        f"router alive {health['router'].get('workers_alive')}, scheduler alive "
        f"{health['scheduler'].get('workers_alive')}, workers {workers}, down {p.down()}\n"
        + "\n".join(p.logs(name, 15) for name in ("router", "scheduler", "worker-0", "worker-1"))
    )


def wait_healthy_again(p: Pipeline, timeout_s: float = 120.0) -> None:
    def ok() -> bool:
        return p.down() == {} and all(h["http_status"] == 200 for h in p.health().values())

    assert wait_until(ok, timeout_s, interval_s=0.2), p.health()


def test_a_worker_killed_mid_stream_with_two_workers(pipeline: Launched, oracle: dict[str, str]) -> None:
    """Its streams move to the other worker and finish with the oracle's text, none silent for 5 s;
    health goes degraded, then ok once the supervisor has brought the worker back, which serves."""
    p, url = pipeline.p, pipeline.p.url
    assert wait_until(lambda: p.health()["router"].get("workers_alive") == [0, 1], 30)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        streams = [pool.submit(stream_chat, url, prompt) for prompt in PROMPTS]

        def running_on_both() -> bool:
            workers = p.stats()["scheduler"]["workers"]
            return all(w["num_requests_running"] > 0 and w["num_steps"] > 2 for w in workers)

        assert wait_until(running_on_both, 60), "the streams never ran on both workers"
        old = p.pids()["worker-1"]
        os.kill(old, signal.SIGKILL)
        killed_at = time.monotonic()
        frontend = f"{url}/health"
        degraded = wait_until(lambda: get_json(frontend).get("down") == ["worker-1"], 5)
        assert wait_until(lambda: all(s.done() for s in streams), 60), what_runs(p)
        results = [s.result() for s in streams]
    assert degraded, "the frontend's /health never named worker-1 as down"
    assert [r.error for r in results] == [None] * len(PROMPTS)
    assert [r.text for r in results] == [oracle[prompt] for prompt in PROMPTS]
    assert all(no_gap_over(r, killed_at, 5.0) for r in results), [r.times[-1] - killed_at for r in results]
    assert p.stats()["scheduler"]["num_moved"] > 0
    wait_healthy_again(p)
    assert p.pids()["worker-1"] != old
    before = p.stats()["router"]["decisions"].get("1", 0)
    assert [chat(url, "Hello!") for _ in range(2)] == [oracle["short"]] * 2  # round robin: one on each
    assert p.stats()["router"]["decisions"]["1"] == before + 1


def test_a_hung_component_is_restarted(pipeline: Launched) -> None:
    """SIGSTOP: alive but silent; past restart_unresponsive_after_s (12 s here) it is killed and restarted."""
    p = pipeline.p
    old = p.pids()["router"]
    os.kill(old, signal.SIGSTOP)
    try:
        assert wait_until(lambda: p.down().get("router") == "restarting", 30), p.down()
        wait_healthy_again(p)
    finally:
        if pid_exists(old):
            os.kill(old, signal.SIGKILL)
    assert p.pids()["router"] != old and not pid_exists(old)
    assert chat(p.url, "Hello!")


def test_the_restart_limit(pipeline: Launched) -> None:
    """max_restarts=2: a sampler that keeps dying is restarted twice, then left failed, and said so;
    a restart by hand puts it back in the supervisor's care."""
    p = pipeline.p
    for _ in range(2):
        os.kill(p.pids()["sampler"], signal.SIGKILL)
        assert wait_until(lambda: "sampler" in p.down(), 5), "the supervisor never noticed"
        wait_healthy_again(p)
    os.kill(p.pids()["sampler"], signal.SIGKILL)
    assert wait_until(lambda: p.down() == {"sampler": "failed"}, 10), p.down()
    # The supervisor marks the part failed, then tells the frontend: wait for the frontend to say so.
    assert wait_until(lambda: p.health()["frontend"]["status"] == "degraded", 5), p.health()["frontend"]
    health = p.health()
    assert health["sampler"]["status"] == "failed"
    assert health["frontend"]["status"] == "degraded" and health["frontend"]["down"] == ["sampler"]
    assert health["frontend"]["http_status"] == 503
    p.restart("sampler")
    wait_healthy_again(p)
    assert chat(p.url, "Hello!")


BAD_SETTINGS = [
    ("max_restarts", -1),
    ("restart_window_s", 0),
    ("restart_window_s", float("inf")),
    ("restart_backoff_s", -0.5),
    ("restart_unresponsive_after_s", float("nan")),
    ("supervise", "yes"),
]


@pytest.mark.parametrize(("field_name", "value"), BAD_SETTINGS)
def test_a_bad_supervision_setting_is_refused(field_name: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field_name):
        PipelineConfig.from_dict({field_name: value})


def test_supervision_flags() -> None:
    config = PipelineConfig.from_cli(
        ["--no-supervise", "--max-restarts", "2", "--restart-unresponsive-after-s", "none"]
    )
    assert (config.supervise, config.max_restarts, config.restart_unresponsive_after_s) == (False, 2, None)
