"""Bytes on the wire: msgpack through msgspec, and never pickle.

A frame is the msgpack encoding of one value. Top-level messages are tagged
``msgspec.Struct``s from ``modkit.protocol``, so ``decode`` returns the right class; the
values inside them (call arguments, results, pub/sub payloads) may be any msgpack-able
value: None, bool, int, float, str, bytes, lists, dicts, Structs and dataclasses. Those
inner values arrive as plain builtins (a Struct becomes a dict); ``convert`` turns them
back into the type the receiver expects.

An RPC server does better for the arguments of a call: it decodes the ``Call`` with each
argument left as raw msgpack (``CallFrame``), then each argument straight into the
annotation of the method's parameter (``decode_args``), in one pass of msgspec's C decoder,
instead of building builtins first and converting them after (twice the work; the figures
are in docs/benchmarks.md).

NOTE: pickle on a socket is remote code execution for whoever can connect
(CVE-2025-30165, CVE-2025-29783, CVE-2025-47277). msgpack can only ever build data, so a
hostile or broken frame costs one ``DecodeError``, which the receiver logs and survives.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar, get_args

import msgspec

from modkit.protocol import Call, ErrorReply, Heartbeat, Ready, Reply, TransportMessage

log = logging.getLogger(__name__)
T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()


class DecodeError(ValueError):
    """A frame that is not valid msgpack, or not the expected message (an unknown tag, a bad field).

    ``req_id`` is the request id found in the frame despite the error, if any, so a server
    can still answer the sender with an error instead of leaving it to time out.
    """

    def __init__(self, message: str, req_id: int | None = None) -> None:
        super().__init__(message)
        self.req_id = req_id


def encode(value: Any) -> bytes:
    """msgpack bytes of ``value``; TypeError for a value msgpack cannot carry (a tensor, a socket)."""
    return _encoder.encode(value)


class Decoder(Generic[T]):
    """Decodes frames into one expected type (a Struct, a union of tagged Structs, or ``Any``)."""

    def __init__(self, type_: Any) -> None:
        self.type = type_
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(type_)

    def decode(self, frame: bytes) -> T:
        try:
            return self._decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise DecodeError(f"undecodable frame ({len(frame)} bytes): {error}", _find_req_id(frame)) from error


def _find_req_id(frame: bytes) -> int | None:
    """The ``req_id`` of a frame that is msgpack but not a known message, so it can be answered."""
    try:
        value = msgspec.msgpack.decode(frame)
    except msgspec.DecodeError:
        return None
    req_id = value.get("req_id") if isinstance(value, dict) else None
    return req_id if type(req_id) is int else None


transport_decoder: Decoder[TransportMessage] = Decoder(TransportMessage)


def decode(frame: bytes) -> TransportMessage:
    """Decode one transport-level message (``modkit.protocol.TransportMessage``); raises ``DecodeError``."""
    return transport_decoder.decode(frame)


class CallFrame(msgspec.Struct, tag="call", frozen=True):
    """A ``Call`` as an RPC server reads it: each argument still msgpack, for ``decode_args``."""

    req_id: int
    method: str
    args: list[msgspec.Raw] = []
    kwargs: dict[str, msgspec.Raw] = {}
    sent_at: float = 0.0
    client_id: bytes = b""


# What reaches an RPC server: every transport message, with calls read as CallFrames.
ServerMessage = CallFrame | Reply | ErrorReply | Ready | Heartbeat
assert {*get_args(ServerMessage)} - {CallFrame} == {*get_args(TransportMessage)} - {Call}, "out of step"
server_decoder: Decoder[Any] = Decoder(ServerMessage)

_arg_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def _arg_decoder(annotation: Any) -> msgspec.msgpack.Decoder[Any]:
    """A decoder into ``annotation``, made once; into builtins if msgspec cannot build that type."""
    decoder = _arg_decoders.get(annotation)
    if decoder is None:
        try:
            decoder = msgspec.msgpack.Decoder(annotation)
        except TypeError:  # not a type msgspec builds (a tensor, a socket): the value stays as decoded
            decoder = msgspec.msgpack.Decoder()
        _arg_decoders[annotation] = decoder
    return decoder


def decode_args(
    found: inspect.Signature | None, args: list[msgspec.Raw], kwargs: dict[str, msgspec.Raw]
) -> tuple[Any, Any]:
    """``convert_args`` for raw arguments: each decoded straight into its parameter's annotation.

    TypeError for a wrong number or name of arguments, or a value that does not fit its
    annotation (the message names the parameter). With no signature, values decode to builtins.
    """
    plain = _arg_decoder(Any)
    if found is None:
        return [plain.decode(a) for a in args], {k: plain.decode(v) for k, v in kwargs.items()}
    bound = found.bind(*args, **kwargs)
    for name, raw in bound.arguments.items():
        parameter = found.parameters[name]
        try:
            if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                bound.arguments[name] = tuple(plain.decode(r) for r in raw)
            elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
                bound.arguments[name] = {k: plain.decode(r) for k, r in raw.items()}
            else:
                annotation = Any if parameter.annotation is inspect.Parameter.empty else parameter.annotation
                bound.arguments[name] = _arg_decoder(annotation).decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as error:
            raise TypeError(f"argument {name!r}: {error}") from None
    return bound.args, bound.kwargs


def convert(value: Any, type_: Any) -> Any:
    """Turn decoded builtins into ``type_`` (dict -> Struct or dataclass, list -> tuple, ...).

    Raises ``msgspec.ValidationError`` when the value does not fit, and ``TypeError`` when
    msgspec cannot build ``type_`` at all.
    """
    return msgspec.convert(value, type_)


def convert_or_keep(value: Any, type_: Any) -> Any:
    """``convert(value, type_)``, or ``value`` itself when msgspec cannot build ``type_``."""
    try:
        return convert(value, type_)
    except TypeError:
        return value


def signature(func: Callable[..., Any]) -> inspect.Signature | None:
    """``func``'s signature with annotations resolved (a class: its constructor's), or None if they cannot be."""
    try:
        return inspect.signature(func, eval_str=True)
    except Exception as error:  # e.g. a name imported only under TYPE_CHECKING
        log.debug("annotations of %s not resolved (%s); values stay as decoded", func, error)
        return None


def return_type(func: Callable[..., Any]) -> Any:
    """What ``func`` is annotated to return, ``Any`` if it is not (or cannot be resolved)."""
    found = signature(func)
    return Any if found is None or found.return_annotation is inspect.Signature.empty else found.return_annotation


def convert_args(found: inspect.Signature | None, args: list[Any], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """Bind decoded arguments to a ``signature(func)`` and convert each to its annotation.

    With no signature the values pass as decoded. TypeError for a wrong number or name of
    arguments, or a value that does not fit its annotation (the message names the parameter).
    """
    if found is None:
        return args, kwargs
    bound = found.bind(*args, **kwargs)
    for name, value in bound.arguments.items():
        parameter = found.parameters[name]
        if parameter.annotation is inspect.Parameter.empty or parameter.kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ):
            continue
        try:
            bound.arguments[name] = convert_or_keep(value, parameter.annotation)
        except msgspec.ValidationError as error:
            raise TypeError(f"argument {name!r}: {error}") from None
    return bound.args, bound.kwargs
