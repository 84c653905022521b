"""Imports point the way the architecture says (the contracts in pyproject's [tool.importlinter]).

Only ``modkit.transport`` imports zmq; a component's core never imports a service module;
components do not import one another's internals. ``lint-imports`` names each broken
contract and the import chain that breaks it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("lint-imports") is None, reason="import-linter is not installed (pip install -e .[dev])"
)
def test_import_contracts_are_kept() -> None:
    # This checkout's modkit, not whichever one is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        ["lint-imports", "--no-cache"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
