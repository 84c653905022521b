"""The benchmark scripts run end to end on the CPU with the embedded model, at toy sizes."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # each script launches the six-process pipeline

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, f"scripts/{script}", "--device", "cpu", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_benchmark_online(tmp_path: Path) -> None:
    out = tmp_path / "online.json"
    run_script(
        "benchmark_online.py",
        *("--num-prompts", "6", "--request-rates", "4", "inf", "--input-len", "16", "--output-len", "8"),
        *("--out", str(out)),
    )
    report = json.loads(out.read_text())
    rows: list[dict[str, Any]] = report["results"]
    assert [r["request_rate"] for r in rows] == [4.0, "inf"]
    assert report["meta"]["args"]["request_rates"] == [4.0, "inf"]
    for row in rows:
        assert row["completed"] == 6 and len(row["requests"]) == 6
        assert all(r["output_tokens"] == 8 for r in row["requests"])
        assert row["total_output_tokens"] == 6 * 8
        assert all(0 < r["ttft_s"] <= r["e2e_s"] for r in row["requests"])
        assert row["output_throughput"] > 0 and row["request_throughput"] > 0
        for name in ("ttft", "itl", "tpot", "e2el"):
            assert 0 < row[f"median_{name}_ms"] <= row[f"p99_{name}_ms"], (name, row)
            assert row[f"mean_{name}_ms"] > 0
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_benchmark_offline(tmp_path: Path) -> None:
    """Engines in processes of their own, alternated round by round; NAME@before imports another checkout."""
    out = tmp_path / "offline.json"
    before = tmp_path / "before"
    shutil.copytree(REPO / "modkit", before / "modkit", ignore=shutil.ignore_patterns("__pycache__"))
    engines = ("modkit", "pipeline", "hf:2", "hf-batch", "modkit@before")
    run_script(
        "benchmark.py",
        *("--engines", *engines, "--num-prompts", "4", "--input-len", "8", "--output-len", "4", "--rounds", "2"),
        *("--before", str(before), "--hf-num-prompts", "2", "--out", str(out)),
    )
    report = json.loads(out.read_text())
    results, meta = report["results"], report["meta"]
    assert meta["warmup_prompts"] == 4  # min(num_prompts, max_num_seqs)
    assert meta["host"]["cores"] >= 1 and meta["host"]["cpu"]
    assert list(results) == list(engines)
    # Each round starts one engine later, so no engine always runs first.
    assert [turn[0] for turn in meta["orders"]] == list(engines[:2])
    for name in engines:
        if name == "hf-batch" and "skipped" in results[name]:  # a transformers without generate_batch
            continue
        r = results[name]
        assert len(r["runs_s"]) == 2
        assert r["output_tokens_per_s_min"] <= r["output_tokens_per_s"] <= r["output_tokens_per_s_max"]
    for name, tokens in (("hf:2", 2 * 4), ("modkit", 4 * 4)):  # HF timed on its first two prompts only
        r = results[name]
        assert r["output_tokens_per_s_max"] == pytest.approx(tokens / min(r["runs_s"]))
    assert results["modkit@before"]["modkit_from"] == str(before)
    assert results["modkit"]["modkit_from"] == str(REPO)
    # Greedy on the same prompts: the pipeline and the other checkout's LLM say what the LLM says.
    assert results["pipeline"]["outputs_equal_modkit"] == 4
    assert results["pipeline"]["vs_modkit"] > 0


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm bench serve is vLLM's client")
def test_benchmark_cpu_quick(tmp_path: Path) -> None:
    """Both modkit servers measured by ``vllm bench serve``, quiet and beside the script's CPU hog."""
    out = tmp_path / "cpu.json"
    run_script("benchmark_cpu.py", "--quick", "--engines", "frontend", "pipeline", "--out", str(out))
    report = json.loads(out.read_text())
    meta, results, samples = report["meta"], report["results"], report["samples"]
    assert meta["machine"]["cores"] >= 1 and meta["versions"]["torch"]
    assert list(results) == ["frontend", "pipeline"]
    for name, row in results.items():
        for phase in ("quiet", "busy"):
            assert len(samples[name][phase]) == 1, (name, phase)
            assert row[f"{phase}_tok_s"] > 0 and row[f"{phase}_tpot_p50_ms"] > 0 and row[f"{phase}_ttft_p50_ms"] > 0
    assert results["frontend"]["quiet_vs_frontend"] == 1.0
    pipeline, frontend = results["pipeline"], results["frontend"]
    assert pipeline["busy_vs_frontend"] == pipeline["busy_tok_s"] / frontend["busy_tok_s"]
