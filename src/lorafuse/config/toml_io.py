"""Typed dataclasses <-> TOML, with errors that name the file, the dotted key, what was expected and what came.

Nested dataclasses are TOML tables. Supported field types: bool, int, float, str, Path, Literal[...], X | None,
unions (`int | float`), list[X], tuple[X, ...], tuple[X, Y], dict[str, X], nested dataclasses (not Optional) and
arrays of tables (`tuple[SomeDataclass, ...]`, TOML's `[[table.key]]`).
TOML has no null: a None value is left out when dumping, so an Optional field must default to None for
dump -> load to round trip (`dump_config` refuses otherwise instead of silently losing the value).

Written by hand on purpose: pydantic is not a dependency of lorafuse (only present transitively), and
dacite / cattrs convert types but produce neither our messages (file, dotted key, allowed keys, close match)
nor CLI string coercion, which are most of this file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import tomli_w

from lorafuse.errors import ConfigError
from lorafuse.utils.atomic import atomic_write_text
from lorafuse.utils.inputs import read_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")
_NONE_WORDS = ("none", "null")
_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class _Mismatch(Exception):
    """Internal: a value does not fit a type; the caller adds file and key."""


class _NotFinite(_Mismatch):
    """Internal: inf or nan where a number is expected (TOML allows both; no setting means them)."""


class _TooLarge(_Mismatch):
    """Internal: an integer beyond 64 bits. TOML 1.0 says a parser must refuse it; tomllib does not, and torch,
    numpy and the seed generators would overflow on it far from the config."""


INT64 = (-(2**63), 2**63 - 1)


def type_name(tp: Any) -> str:
    """How a type reads in a message: `int | float`, `list[str]`, `one of 'l1', 'l2'`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join("none" if a is type(None) else type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, from_cli: bool) -> Any:
    """`value` as type `tp`, or _Mismatch. `from_cli` lets strings stand for other types ("8" -> 8)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if from_cli and isinstance(value, str) and value.lower() in _NONE_WORDS and type(None) in args:
            return None
        # A CLI string stays a string where `str` is allowed, unless it is written as an array ('["a", "b"]').
        as_array = from_cli and isinstance(value, str) and value.lstrip().startswith("[")
        members = sorted(args, key=lambda a: (a is str) == as_array)
        for member in members:
            if member is type(None):
                continue
            try:
                return _convert(value, member, from_cli)
            except (_NotFinite, _TooLarge):
                raise
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return allowed
            if from_cli and isinstance(value, str) and value == str(allowed):
                return allowed
        raise _Mismatch
    if dataclasses.is_dataclass(tp):
        raise _Mismatch  # tables are handled by _build, which knows the dotted path
    if origin in (list, tuple):
        if from_cli and isinstance(value, str):
            value = _parse_cli_array(value)
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is list:
            return [_convert(v, args[0], from_cli) for v in value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], from_cli) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_convert(v, a, from_cli) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        return {str(k): _convert(v, args[1], from_cli) for k, v in value.items()}
    return _convert_scalar(value, tp, from_cli)


def _convert_scalar(value: Any, tp: Any, from_cli: bool) -> Any:
    if from_cli and isinstance(value, str) and tp is not str and tp is not Path:
        value = _parse_cli_scalar(value, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):  # bool is an int subclass: refuse it
            if not INT64[0] <= value <= INT64[1]:
                raise _TooLarge
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, int) and abs(value) > sys.float_info.max:  # a float would overflow to inf
                raise _NotFinite
            if not math.isfinite(value):
                raise _NotFinite
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    else:
        raise TypeError(f"toml_io does not support fields of type {tp!r}")
    raise _Mismatch


def _parse_cli_scalar(text: str, tp: Any) -> Any:
    low = text.strip().lower()
    if tp is bool:
        return True if low in _TRUE_WORDS else False if low in _FALSE_WORDS else text
    try:
        return int(text) if tp is int else float(text)
    except ValueError:
        return text


def _parse_cli_array(text: str) -> Any:
    """`'["a", "b"]'` as TOML, else comma-separated: `a,b`. Unparseable text stays a string (a type error)."""
    if text.strip().startswith("["):
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            return text
    return [part.strip() for part in text.split(",") if part.strip()]


def _unknown_key_message(source: str, key: str, allowed: list[str]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    # difflib catches typos ("netwrk_dim"); the substring test catches short forms ("dim" -> "network_dim").
    # Of several substring matches the shortest are the likeliest ("dim" -> network_dim, not dim_from_weights).
    close = difflib.get_close_matches(leaf, allowed, n=1) or sorted(
        sorted((k for k in allowed if leaf in k), key=len)[:3]
    )
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return f"{source}: unknown key '{key}'{hint}; allowed keys here: {', '.join(allowed)}"


NO_FILE = "<defaults>"  # the source of a config built from defaults and command-line options only


def _origin(source: str, key: str, cli_keys: frozenset[str]) -> str:
    """Where the value of `key` came from, as the start of a message: the file; "command line" for an option that
    overrides a file's value; nothing without a file (the key names the option, and listing every option given
    before the problem buried it)."""
    if key in cli_keys:
        return "" if source == NO_FILE else "command line: "
    return "" if source == NO_FILE else f"{source}: "


def _build(cls: type[T], data: Any, source: str, prefix: str, cli_keys: frozenset[str] = frozenset()) -> T:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_origin(source, where, cli_keys)}{where}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key_message(source, f"{prefix}{key}", sorted(fields)))  # only a file's
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        dotted = f"{prefix}{name}"
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                todo = "; give it in a config file or as a command-line option" if source == NO_FILE else ""
                raise ConfigError(f"{_origin(source, dotted, cli_keys)}missing required key '{dotted}' "
                                  f"({type_name(hints[name])}){todo}")  # fmt: skip
            continue
        tp, value = hints[name], data[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, source, f"{dotted}.", cli_keys)
            continue
        if table_array_type(tp) is not None:
            kwargs[name] = _build_array(table_array_type(tp), value, source, dotted, cli_keys)
            continue
        origin = _origin(source, dotted, cli_keys)
        try:
            # Strings are coerced only where they came from the CLI: a quoted "8" in a file is a type error.
            kwargs[name] = _convert(value, tp, from_cli=dotted in cli_keys)
        except _NotFinite:
            raise ConfigError(
                f"{origin}{dotted}: must be a finite number, got {value!r}; inf and nan are not settings"
            ) from None
        except _TooLarge:
            raise ConfigError(
                f"{origin}{dotted}: {value} does not fit in a 64-bit integer, the most TOML allows "
                f"([{INT64[0]}, {INT64[1]}])"
            ) from None
        except _Mismatch:
            raise ConfigError(f"{origin}{dotted}: expected {type_name(tp)}, got {value!r}") from None
    try:
        return cls(**kwargs)
    except ConfigError as e:  # __post_init__ validation starts with the field's name; add where it came from
        key = prefix + str(e).split(":", 1)[0].split(" ", 1)[0]
        raise ConfigError(f"{_origin(source, key, cli_keys)}{prefix}{e}") from None


def table_array_type(tp: Any) -> type | None:
    """The element class of a `tuple[SomeDataclass, ...]` / `list[SomeDataclass]` field (a TOML array of tables)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (list, tuple) and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _build_array(cls: type, value: Any, source: str, dotted: str, cli_keys: frozenset[str]) -> tuple:
    if not isinstance(value, (list, tuple)):
        origin = _origin(source, dotted, cli_keys)
        raise ConfigError(f"{origin}{dotted}: expected an array of tables ([[{dotted}]]), got {value!r}")
    return tuple(_build(cls, item, source, f"{dotted}[{i}].", cli_keys) for i, item in enumerate(value))


def _merge_overrides(cls: type, data: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    """Write `{"network.network_dim": "8"}` into the nested dict, checking every key against `cls`."""
    for dotted, value in overrides.items():
        target, node_cls = data, cls
        parts = dotted.split(".")
        for depth, part in enumerate(parts):
            names = sorted(f.name for f in dataclasses.fields(node_cls) if f.init)
            if part not in names:
                raise ConfigError(_unknown_key_message("command line", ".".join(parts[: depth + 1]), names))
            tp = typing.get_type_hints(node_cls)[part]
            if depth == len(parts) - 1:
                target[part] = value
            elif dataclasses.is_dataclass(tp):
                target = target.setdefault(part, {})
                node_cls = tp
            else:
                raise ConfigError(f"command line: '{'.'.join(parts[: depth + 1])}' is a value, not a table")


def read_toml(path: str | os.PathLike, what: str = "config file") -> dict[str, Any]:
    """The tables of a TOML file; a missing, unreadable, binary, non-UTF-8 or malformed file is one
    `ConfigError` naming it (tomllib alone raises UnicodeDecodeError or IsADirectoryError tracebacks)."""
    text = read_text(path, what, ConfigError)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def config_from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>") -> T:
    """Build `cls` from plain TOML-like data; errors name `source`."""
    return _build(cls, data, source, "")


def load_config(
    cls: type[T], path: str | os.PathLike | None, overrides: Mapping[str, Any] | None = None
) -> T:
    """Read `path` (or only defaults when None) as `cls`, then apply dotted-key overrides from the CLI.

    Override values may be strings ("8", "true", "0.5", "a,b", '["a", "b"]'); they are coerced to the field type.
    """
    source = NO_FILE if path is None else str(path)
    data: dict[str, Any] = {}
    if path is not None:
        data = read_toml(path)
    return build_config(cls, data, source, overrides)


def build_config(
    cls: type[T], data: dict[str, Any], source: str, overrides: Mapping[str, Any] | None = None
) -> T:
    """`cls` from TOML-like `data` (changed in place by the overrides), errors naming `source` (`NO_FILE`: no
    file) or the command line, whichever gave the value."""
    if overrides:
        _merge_overrides(cls, data, overrides)
    return _build(cls, data, source, "", frozenset(overrides or ()))


def config_to_dict(obj: Any) -> dict[str, Any]:
    """TOML-ready data: None values left out, Paths as strings, tuples as lists."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(obj):
        if not field.init:  # derived fields are not settings; load_config would reject them as unknown keys
            continue
        value = getattr(obj, field.name)
        if value is None:
            if field.default is not None:
                raise ValueError(
                    f"{type(obj).__name__}.{field.name} is None but defaults to {field.default!r}"
                )
            continue
        out[field.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def dump_config(obj: Any) -> str:
    return tomli_w.dumps(config_to_dict(obj))


def save_config(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_text(path, dump_config(obj))
