"""Shared fixtures (random-weight checkpoints built from configs, the embedded model), and
the ``slow`` mark on every notebook that nbval collects."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from modkit.checks import make_random_checkpoint
from modkit.model import embedded_model_dir

# Tests run beside other processes on two cores; spinning OpenMP threads would starve them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by mark
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every notebook cell is ``slow``: each notebook starts a Jupyter kernel and launches a pipeline.

    The test files mark themselves (``pytestmark``, or per test where a file mixes); the
    notebooks cannot, so ``python -m pytest -m "not slow" --nbval-lax tests notebooks``
    runs the fast tier alone, as ``-m "not slow" tests`` does.
    """
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """random_checkpoint(shape) -> folder of a random-weight HF checkpoint, built once per shape."""
    built: dict[str, Path] = {}

    def get(shape: str) -> Path:
        if shape not in built:
            built[shape] = make_random_checkpoint(shape, tmp_path_factory.mktemp(shape))
        return built[shape]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    path = embedded_model_dir()
    assert (path / "config.json").is_file(), f"the embedded model is missing from {path}"
    return path
