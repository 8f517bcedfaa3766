"""Every option of `TrainConfig` as a flat list (table, kohya name, type, default, help text): what
`lorafuse train --help` prints and what the web UI's training form is generated from."""

from __future__ import annotations

import dataclasses
import typing

from lorafuse.config.field_docs import field_docs


@dataclasses.dataclass(frozen=True)
class Option:
    table: str  # "network"
    name: str  # "network_dim"
    type: typing.Any
    default: typing.Any  # dataclasses.MISSING when required
    doc: str

    @property
    def key(self) -> str:
        return f"{self.table}.{self.name}"

    @property
    def is_bool(self) -> bool:
        return self.type is bool

    @property
    def is_sequence(self) -> bool:
        args = (self.type, *typing.get_args(self.type))
        return any(typing.get_origin(a) in (list, tuple) for a in args)


def options() -> list[Option]:
    """Every field of every table of `TrainConfig`, in declaration order; arrays of tables ([[dataset.subsets]])
    and tables of values (optimizer.optimizer_args) are not flat options (no flag, no form field): they live in
    the TOML file only."""
    from lorafuse.config.toml_io import table_array_type
    from lorafuse.train.config import TrainConfig

    out = []
    hints = typing.get_type_hints(TrainConfig)
    for table in dataclasses.fields(TrainConfig):
        cls = hints[table.name]
        sub_hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            if table_array_type(sub_hints[f.name]) is not None or typing.get_origin(sub_hints[f.name]) is dict:
                continue  # tables in the TOML file only; kohya's --optimizer_args flag fills optimizer_args
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            out.append(Option(table.name, f.name, sub_hints[f.name], default, docs.get(f.name, "")))
    return out
