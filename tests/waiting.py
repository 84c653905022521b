"""Waiting on a condition, bounded: what the tests do instead of sleeping "long enough"."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def wait_until(predicate: Callable[[], object], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout_s`` has passed (False).

    The caller asserts on the result with a message that says what never happened, or, where
    the assertions that follow say it better, goes on and lets them fail.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def pid_exists(pid: int) -> bool:
    """Whether process ``pid`` is alive: a zombie still answers kill(0), but its /proc status says so."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())
