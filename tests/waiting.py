"""Waiting on a condition, bounded: what the tests do instead of sleeping "long enough"."""

from __future__ import annotations

import time
from collections.abc import Callable


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
