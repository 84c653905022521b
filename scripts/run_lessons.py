"""Run every lesson notebook on one model and record, per notebook, whether it passed and how long it took.

    python scripts/run_lessons.py                                    # the embedded tiny model
    python scripts/run_lessons.py --model DIR 01 03                  # MODKIT_MODEL=DIR, notebooks 01 and 03
    python scripts/run_lessons.py --make-model qwen2.5-0.5b DIR      # build a random checkpoint in DIR, then run on it

``--make-model SHAPE DIR`` saves a random-weight checkpoint of one of
``modkit.checks.RANDOM_MODEL_SHAPES`` (``qwen2.5-0.5b`` has Qwen2.5-0.5B's shapes) with the embedded
model's tokenizer and chat template, so the lessons' chats run on it without a download; a DIR that
already holds a checkpoint is used as it is.

Each notebook runs as ``scripts/build_lessons.py`` runs it (a fresh kernel through nbclient, from
``notebooks/``), with ``MODKIT_MODEL`` set for the kernel; the notebooks pick the device and dtype
themselves (a GPU and bfloat16 when there is one). A failing notebook does not stop the others.
The table goes to the terminal; the same rows, with the failing cell and its error, go to
``--out`` as JSON, and the executed notebooks beside it, outputs (up to a failure) included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from build_lessons import lesson_paths, run_in_kernel  # noqa: E402  (the one way notebooks are run)

DEFAULT_OUT = REPO / "build" / "lessons" / "run_lessons.json"


def run_one(path: Path, executed: Path) -> dict[str, Any]:
    """Run one notebook into ``executed/<name>``, outputs up to a failure included; its row: passed,
    seconds, and for a failure the cell's index, source and error."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    row: dict[str, Any] = {"notebook": path.name}
    t0 = time.perf_counter()
    try:
        seconds = run_in_kernel(notebook, path.parent)
        row.update(passed=True, seconds=round(seconds, 1))
    except Exception as err:  # a failing cell, a kernel that died or timed out: one row, and the next notebook runs
        row.update(passed=False, seconds=round(time.perf_counter() - t0, 1), error=_error_line(err))
        row.update(_failing_cell(notebook))
    nbformat.write(notebook, executed / path.name)
    return row


def _error_line(err: Exception) -> str:
    """The exception's name and message; for a failing cell, the kernel's (nbclient keeps them)."""
    name, value = getattr(err, "ename", None), getattr(err, "evalue", None)
    return f"{name}: {value}" if name else f"{type(err).__name__}: {err}"


def _failing_cell(notebook: Any) -> dict[str, Any]:
    """The index and source of the code cell that holds an error output (None if none does: a timeout)."""
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code" and any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            return {"cell": index, "cell_source": cell.source[:2000]}
    return {"cell": None}


def environment(model: str | None) -> dict[str, Any]:
    """What the numbers depend on: the machine, the accelerator, the versions, the model."""
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "model": model or "modkit/tiny-chat",
        "gpu": gpu,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    width = max(len(r["notebook"]) for r in rows)
    print(f"\n{'notebook':<{width}}  result  seconds  error")
    for r in rows:
        result = "pass" if r["passed"] else "FAIL"
        error = r.get("error", "").splitlines()[0][:100] if r.get("error") else ""
        print(f"{r['notebook']:<{width}}  {result:<6}  {r['seconds']:>7.1f}  {error}")
    passed = sum(r["passed"] for r in rows)
    print(f"{passed}/{len(rows)} passed in {sum(r['seconds'] for r in rows):.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefixes", nargs="*", help="only notebooks whose names start so (01, 05_routing ...)")
    parser.add_argument("--model", help="a checkpoint folder or hub id, set as MODKIT_MODEL (default: the tiny model)")
    parser.add_argument(
        "--make-model",
        nargs=2,
        metavar=("SHAPE", "DIR"),
        help="save a random SHAPE checkpoint (qwen2.5-0.5b ...) to DIR, unless it holds one; run on it",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="the JSON report (executed notebooks go beside it)"
    )
    options = parser.parse_args(argv)
    if options.make_model and options.model:
        parser.error("give --model or --make-model, not both")

    paths = lesson_paths(options.prefixes)
    model = options.model
    if options.make_model:
        from modkit.checks import make_random_checkpoint

        shape, folder = options.make_model
        if (Path(folder) / "config.json").is_file():
            print(f"using the checkpoint already in {folder}")
        else:
            print(f"saving a random {shape} checkpoint to {folder} ...")
            make_random_checkpoint(shape, folder, tokenizer="embedded")
        model = str(Path(folder).resolve())
    if model:
        os.environ["MODKIT_MODEL"] = model  # each notebook's kernel inherits this process's environment

    executed = options.out.parent / f"{options.out.stem}_notebooks"
    executed.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"environment": environment(model), "notebooks": []}
    for path in paths:
        print(f"running {path.name} ...", flush=True)
        row = run_one(path, executed)
        report["notebooks"].append(row)
        print(f"  {'pass' if row['passed'] else 'FAIL'} in {row['seconds']:.1f} s", flush=True)
        options.out.write_text(json.dumps(report, indent=2))  # a report so far, should a later one hang
    print_table(report["notebooks"])
    print(f"report: {options.out}")
    return 0 if all(r["passed"] for r in report["notebooks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
