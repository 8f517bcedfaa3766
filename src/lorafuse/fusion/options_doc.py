"""What each fusion method's options are, for `lorafuse fuse --help` / `--help-options` and the web UI's form.

Everything comes from the registry: the method's `summary`, its config dataclass (type, default, the comment
beside the field) and its own `validate`. Ranges are not written down twice: each numeric option is set to a
value far out of any sensible range (±1e9) and the message the method's check gives back is shown, so the help
cannot drift from what `lorafuse fuse` accepts.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass

from lorafuse.config.field_docs import field_docs
from lorafuse.config.toml_io import type_name
from lorafuse.errors import UserInputError
from lorafuse.fusion.registry import get_method, method_names

_PROBES = (1e9, -1e9)


@dataclass(frozen=True)
class MethodOption:
    name: str
    type: typing.Any
    default: typing.Any
    doc: str
    constraint: str  # what the method's check says about out-of-range values; "" when it accepts anything
    choices: tuple[str, ...] = ()  # for Literal-typed options

    @property
    def type_name(self) -> str:
        return type_name(self.type)


def _numeric(tp: typing.Any) -> type | None:
    """int or float if the option takes numbers (also `float | None`), else None."""
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, type(int | None)) else (tp,)
    for kind in (float, int):
        if kind in members:
            return kind
    return None


def _constraint(method: str, cls: type, name: str, kind: type) -> str:
    messages: list[str] = []
    for probe in _PROBES:
        value = kind(probe)
        try:
            cfg = cls(**{name: value})
            cfg.validate(method)
        except UserInputError as e:
            text = str(e)
            head = f"option {name}="
            if head not in text:  # another option's check (e.g. ZipLoRA's missing references) spoke first
                continue
            text = text.split(head, 1)[1]
            text = re.sub(r"^\S+\s*", "", text)  # the probed value itself
            text = re.sub(r"^is out of range ", "range ", text)
            if text not in messages:
                messages.append(text)
        except (TypeError, ValueError):
            continue
    return "; ".join(messages)


def method_options(method: str) -> list[MethodOption]:
    """The options of `method` in declaration order (the shared content/style weights first)."""
    cls = get_method(method).config_cls
    hints = typing.get_type_hints(cls)
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins over its base's
        if dataclasses.is_dataclass(klass) and klass is not object:
            docs.update(field_docs(klass))
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        tp = hints[f.name]
        choices = tuple(typing.get_args(tp)) if typing.get_origin(tp) is typing.Literal else ()
        kind = _numeric(tp)
        constraint = _constraint(method, cls, f.name, kind) if kind is not None else ""
        out.append(MethodOption(f.name, tp, default, docs.get(f.name, ""), constraint, choices))
    return out


def methods_help() -> str:
    """One line per registered method: its name and summary."""
    names = method_names()
    width = max(map(len, names))
    return "\n".join(f"  {n.ljust(width)}  {get_method(n).summary}" for n in names)


def format_default(value: typing.Any) -> str:
    if value is None:
        return "unset"
    if dataclasses.is_dataclass(value) or callable(value):
        return f"<{type(value).__name__}>"
    if isinstance(value, float):
        return repr(value) if len(repr(value)) <= 10 else f"{value:.6g}"
    return repr(value) if isinstance(value, str) else str(value)


def options_help(method: str) -> str:
    """The text of `lorafuse fuse --method NAME --help-options`."""
    lines = [f"{method}: {get_method(method).summary}", "", "options (--set NAME=VALUE, or a [method] TOML table):"]
    for opt in method_options(method):
        lines.append(f"  {opt.name}  ({opt.type_name}; default: {format_default(opt.default)})")
        if opt.constraint:
            lines.append(f"      accepted: {opt.constraint}")
        if opt.doc:
            lines.append(f"      {opt.doc}")
    return "\n".join(lines)
