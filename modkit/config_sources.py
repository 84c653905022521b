"""Where a ``PipelineConfig`` comes from besides keyword arguments: YAML/JSON files and command-line flags.

Every failure is a ``ConfigError`` naming the field, the flag or the file, so a bad value
is refused the same way whichever source it came from. The flags are made from the
config's own fields (``--block-size`` for ``block_size``); a value follows its flag and
is parsed to the field's type (a list from comma-separated values, a dict from JSON);
``none`` means None where a field allows it.
"""

from __future__ import annotations

import argparse
import difflib
import json
from collections.abc import Iterable
from dataclasses import Field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from modkit.engine.config import ConfigError


def reject_unknown_keys(keys: Iterable[object], names: list[str], where: str = "") -> None:
    """ConfigError for the first key that is not a field name, with the closest name as a hint."""
    for key in keys:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the fields are {', '.join(names)}"
            raise ConfigError(str(key), f"is not a PipelineConfig field{where}; {hint}")


def read_file(path: Path, names: list[str]) -> dict[str, Any]:
    """The mapping a config file holds; every failure is a ConfigError naming the file."""
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError("config", f"file {str(path)!r} must end in .yaml, .yml or .json, got {suffix!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError("config", f"file {str(path)!r} cannot be read: {err.strerror or err}") from err
    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        kind = "JSON" if suffix == ".json" else "YAML"
        raise ConfigError("config", f"file {str(path)!r} does not parse as {kind}: {err}") from err
    if data is None:  # an empty YAML file: every default
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"file {str(path)!r} must hold a mapping of fields, got {type(data).__name__}")
    reject_unknown_keys(data, names, where=f" (in {path})")
    return data


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a bad command line raises ConfigError, as every other source does."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError("command line", message)


def parse_cli(argv: list[str] | None, config_fields: tuple[Field[Any], ...]) -> tuple[dict[str, Any], str | None]:
    """The fields given as flags (``sys.argv[1:]`` when None), parsed to their types, and ``--config FILE``."""
    args, extra = _argument_parser(config_fields).parse_known_args(argv)
    if extra:
        _reject_unknown_flags(extra, config_fields)
    given = vars(args)  # only the flags on the command line: every default is SUPPRESS
    config_file = given.pop("config", None)
    kinds = {f.name: str(f.type) for f in config_fields}
    return {name: _parse_flag_value(name, kinds[name], value) for name, value in given.items()}, config_file


def _argument_parser(config_fields: tuple[Field[Any], ...]) -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        description="Configuration of the modkit pipeline. Optional values take 'none' for their default.",
        allow_abbrev=False,  # --block would otherwise mean --block-size
        argument_default=argparse.SUPPRESS,  # so the namespace holds only the flags given
    )
    parser.add_argument("--config", metavar="FILE", help="a .yaml, .yml or .json file of fields; flags override it")
    for f in config_fields:
        text = f"default: {f.default}"
        if f.name == "api_key":
            text += " (the process list shows flags to every user: prefer --config)"
        if f.type == "bool":
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(_flag(f.name), metavar=str(f.type).removesuffix(" | None").upper(), help=text)
    return parser


def _parse_flag_value(name: str, kind: str, value: Any) -> Any:
    """A flag's text as its field's type: 'none' -> None where allowed, '16' -> 16; bools come parsed."""
    if not isinstance(value, str):
        return value
    if kind.endswith(" | None") and value.lower() == "none":
        return None
    if kind.startswith("list"):  # --devices cuda:0,cuda:1
        return [item.strip() for item in value.split(",")]
    if kind.startswith("dict"):
        try:
            return json.loads(value)
        except ValueError:
            raise ConfigError(name, f"must be a JSON object, got {value!r} (from {_flag(name)})") from None
    parse = {"int": int, "float": float}.get(kind.removesuffix(" | None"))
    if parse is None:
        return value
    try:
        return parse(value)
    except ValueError:
        noun = "an integer" if parse is int else "a number"
        raise ConfigError(name, f"must be {noun}, got {value!r} (from {_flag(name)})") from None


def _reject_unknown_flags(extra: list[str], config_fields: tuple[Field[Any], ...]) -> NoReturn:
    known = ["--config"]
    for f in config_fields:
        known += [_flag(f.name), "--no-" + _flag(f.name)[2:]] if f.type == "bool" else [_flag(f.name)]
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if flag.startswith("-"):
            close = difflib.get_close_matches(flag, known, n=1)
            hint = f"did you mean {close[0]}?" if close else "see --help"
            raise ConfigError(flag, f"is not a flag of the pipeline's command line; {hint}")
    raise ConfigError("command line", f"has unexpected arguments {extra!r}; every value follows its --flag")
