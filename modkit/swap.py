"""Naming an implementation to swap in: a registry name, an import path, or a class sent by value.

::

    "sjf"                           a name in the component's registry
    "mypackage.policies:Fair"       an import path, imported in the component's process
    MyPolicy                        a class defined in a notebook cell: cloudpickled, signed

A class sent by value is code that the receiving process will run, so it travels as
``SignedCode``: the cloudpickle bytes and an HMAC-SHA256 of them under a key that only the
launcher and the processes it started hold (``Pipeline`` makes one per launch and hands it
to each child on its stdin, never on a command line). The receiver checks the HMAC, in
constant time, before anything is unpickled; a payload signed under another key, or
changed on the way, is refused with ``SignatureError`` and never loaded.

A name or an import path travels in the ``swap`` call itself, and a component serves
that call only when it is signed under the launch's key (``modkit.transport.security``),
checked before the call is decoded: a module is imported only when the launch asked.

What happens to the class once resolved (its trial, the guard, a rollback) is the same for
every part: ``modkit.guard``.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import secrets
from typing import Any

import msgspec


class SignatureError(ValueError):
    """A payload of code whose signature does not verify: it is not unpickled."""


class SignedCode(msgspec.Struct, frozen=True):
    """A class by value: cloudpickle bytes, and their HMAC-SHA256 under the launch's key."""

    pickled: bytes
    signature: str  # hex


class ImplSpec(msgspec.Struct, frozen=True):
    """Which implementation to swap in: exactly one of the three."""

    name: str | None = None  # in the component's registry
    import_path: str | None = None  # "package.module:Class"
    code: SignedCode | None = None  # a class sent by value

    def describe(self) -> str:
        if self.code is not None:
            return "a class sent by value"
        return self.name or self.import_path or "?"

    def label(self, cls: type) -> str:
        """How health and ``Swapped`` events name the implementation: as it was asked for, or by
        its class's name if it was sent by value."""
        return cls.__qualname__ if self.code is not None else self.describe()


def new_key() -> str:
    """A fresh signing key (hex), one per launch."""
    return secrets.token_hex(32)


def sign(obj: Any, key: str) -> SignedCode:
    """``obj`` (a class, say) pickled by value with cloudpickle, and signed."""
    import cloudpickle

    pickled = cloudpickle.dumps(obj)
    return SignedCode(pickled, hmac.new(bytes.fromhex(key), pickled, hashlib.sha256).hexdigest())


def load_signed(code: SignedCode, key: str | None) -> Any:
    """The object ``sign`` packed, once its signature verifies under ``key``; SignatureError otherwise."""
    if key is None:
        raise SignatureError("this process holds no signing key (started by hand?): it accepts no code by value")
    expected = hmac.new(bytes.fromhex(key), code.pickled, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, code.signature):
        raise SignatureError("the code's signature does not verify: refused, not unpickled")
    import cloudpickle

    return cloudpickle.loads(code.pickled)


def spec_for(impl: str | type, key: str | None) -> ImplSpec:
    """The ImplSpec for what a user named: a string with ":" is an import path, another string a name."""
    if isinstance(impl, str):
        return ImplSpec(import_path=impl) if ":" in impl else ImplSpec(name=impl)
    if not isinstance(impl, type):
        raise TypeError(f"swap takes a registry name, 'package.module:Class', or a class; got {impl!r}")
    if key is None:
        raise SignatureError("no signing key: only a pipeline launched by Pipeline.launch can take classes by value")
    return ImplSpec(code=sign(impl, key))


def resolve(spec: ImplSpec, registry_get: Any, key: str | None) -> type:
    """The class ``spec`` names: from the registry, by import, or unpickled after its signature verifies."""
    if spec.code is not None:
        cls = load_signed(spec.code, key)
    elif spec.import_path is not None:
        module_name, _, attr = spec.import_path.partition(":")
        if not module_name or not attr:
            raise ValueError(f"an import path is 'package.module:Class', got {spec.import_path!r}")
        cls = getattr(importlib.import_module(module_name), attr)
    elif spec.name is not None:
        cls = registry_get(spec.name)
    else:
        raise ValueError("name one implementation: a name, an import path or a class")
    if not isinstance(cls, type):
        raise TypeError(f"{spec.describe()} is not a class: {cls!r}")
    return cls
