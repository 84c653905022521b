"""Objects that tests/test_transport.py runs in child processes (imported there as ``transport_targets:Echo``).

They live in tests/, not in the package; the tests put this folder on the child's PYTHONPATH.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import msgspec


class Point(msgspec.Struct, frozen=True):
    x: int
    y: int


@dataclass(slots=True)
class Pair:
    left: int
    right: int


class Echo:
    """A component with nothing to it: answers, fails, or dawdles on request."""

    def __init__(self, greeting: str = "hello", origin: Point | None = None) -> None:
        assert origin is None or isinstance(origin, Point), "constructor kwargs are rebuilt from annotations"
        self.greeting = greeting
        self.origin = origin

    def get_origin(self) -> Point | None:
        return self.origin

    def echo(self, value: Any) -> Any:
        return value

    def greet(self, name: str) -> str:
        return f"{self.greeting}, {name}"

    def pid(self) -> int:
        return os.getpid()

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def sleep(self, seconds: float, value: Any = None) -> Any:
        time.sleep(seconds)
        return value

    def shift(self, point: Point, pair: Pair) -> Point:
        """Arguments arrive as dicts and are converted to the annotated Struct and dataclass."""
        assert isinstance(point, Point) and isinstance(pair, Pair)
        return Point(point.x + pair.left, point.y + pair.right)

    def _secret(self) -> str:
        return "never served"
