"""Named implementations of one interface, so a notebook or a config can pick one by name.

Every swappable component (attention backends, samplers, scheduling policies, ...) keeps
one ``Registry``; its module exposes ``register_x`` / ``get_x`` helpers around it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
C = TypeVar("C", bound=type)


def implementation_name(obj: object) -> str:
    """The name a class (or an instance's class) was registered under, else its class name.

    Only the class's own registration counts: a subclass of a registered class is not it.
    """
    cls = obj if isinstance(obj, type) else type(obj)
    return str(cls.__dict__.get("name") or cls.__qualname__)


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind  # what the entries are, for error messages: "attention backend"
        self._classes: dict[str, type[T]] = {}
        self._paths: dict[str, str] = {}  # name -> "package.module:Class", imported on first use

    def register_path(self, name: str, path: str) -> None:
        """Register ``name`` for a class imported only when first asked for (one that needs an
        optional, slow-to-import package, such as vLLM)."""
        if name in self._classes or name in self._paths:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._paths[name] = path

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator: make the class available under ``name`` (also set as ``cls.name``)."""

        def register(cls: C) -> C:
            if name in self._classes or name in self._paths:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            cls.name = name  # type: ignore[attr-defined]
            self._classes[name] = cls
            return cls

        return register

    def get(self, name: str) -> type[T]:
        if name in self._paths and name not in self._classes:
            module, _, attr = self._paths[name].partition(":")
            cls = getattr(importlib.import_module(module), attr)  # an ImportError says what to install
            cls.name = name
            self._classes[name] = cls
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {self.names()}")
        return self._classes[name]

    def names(self) -> list[str]:
        return sorted({*self._classes, *self._paths})
