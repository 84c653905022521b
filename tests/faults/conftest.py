"""The fault suite: every test here is ``faults`` and ``slow`` (most start a pipeline).

Run it alone with ``python -m pytest -m faults tests``; README's test command runs it with
the rest. What each test promises, and what it measured: docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.slow)
