"""scripts/run_lessons.py's rows: a notebook that runs passes; one that fails names its cell and error,
and its executed copy keeps the outputs up to the failure. The kernel sees the environment."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.slow  # each notebook starts a Jupyter kernel

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("run_lessons", REPO / "scripts" / "run_lessons.py")
assert _spec is not None and _spec.loader is not None
run_lessons = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_lessons)


def write_notebook(path: Path, *sources: str) -> Path:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nbformat.write(notebook, path)
    return path


def test_rows_for_a_pass_and_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODKIT_MODEL", "/some/checkpoint")
    good = write_notebook(
        tmp_path / "00_good.ipynb", "import os", "assert os.environ['MODKIT_MODEL'] == '/some/checkpoint'"
    )
    bad = write_notebook(tmp_path / "01_bad.ipynb", "x = 1", "assert x == 2, 'x is not two'", "print('never')")
    executed = tmp_path / "executed"
    executed.mkdir()

    passed = run_lessons.run_one(good, executed)
    assert passed["passed"] and passed["seconds"] > 0 and "error" not in passed
    assert nbformat.read(executed / good.name, as_version=4).cells[1].outputs == []

    failed = run_lessons.run_one(bad, executed)
    assert not failed["passed"] and failed["seconds"] > 0
    assert failed["error"] == "AssertionError: x is not two"
    assert failed["cell"] == 1 and failed["cell_source"].startswith("assert x == 2")
    cells = nbformat.read(executed / bad.name, as_version=4).cells
    assert cells[1].outputs[0].output_type == "error" and cells[2].outputs == [], "kept up to the failure"
