"""What both kohya converters (flat configs, dataset_config files) write into: one row per kohya key, and the
nested lorafuse config data they build."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafuse.errors import ConfigError


@dataclass(frozen=True)
class Row:
    key: str  # the kohya key ("network_args.conv_dim", "datasets[0].subsets[1].num_repeats")
    value: Any
    action: str  # mapped | default | no effect | refused
    detail: str  # our key and value, or the reason


@dataclass
class KohyaImport:
    data: dict[str, Any] = field(default_factory=dict)  # our nested config data
    rows: list[Row] = field(default_factory=list)
    refused: list[Row] = field(default_factory=list)

    def put(self, target: str, value: Any, key: str, raw: Any, how: str = "", action: str = "mapped") -> None:
        table, name = target.split(".")
        self.data.setdefault(table, {})[name] = value
        shown = value.as_posix() if isinstance(value, Path) else value
        text = (
            f"[{len(value)} tables]"
            if isinstance(value, list) and value and isinstance(value[0], dict)
            else repr(shown)
        )
        self.rows.append(Row(key, raw, action, f"{target} = {text}" + (f" ({how})" if how else "")))

    def note(self, key: str, raw: Any, reason: str) -> None:
        self.rows.append(Row(key, raw, "no effect", reason))

    def refuse(self, key: str, raw: Any, reason: str) -> None:
        row = Row(key, raw, "refused", reason)
        self.rows.append(row)
        self.refused.append(row)

    def table(self) -> str:
        """The mapping as a plain-text table, one kohya key per line."""
        width = max((len(r.key) for r in self.rows), default=10)
        lines = [f"{'kohya key'.ljust(width)}  {'action'.ljust(9)}  lorafuse / reason"]
        for r in self.rows:
            lines.append(f"{r.key.ljust(width)}  {r.action.ljust(9)}  {r.detail}")
        counts = {a: sum(r.action == a for r in self.rows) for a in ("mapped", "default", "no effect", "refused")}
        lines.append(f"{len(self.rows)} keys: " + ", ".join(f"{n} {a}" for a, n in counts.items()))
        return "\n".join(lines)

    def check(self, source: str) -> None:
        if self.refused:
            lines = "\n".join(f"  {r.key} = {r.value!r}: {r.detail}" for r in self.refused)
            raise ConfigError(
                f"{source}: {len(self.refused)} kohya setting(s) that lorafuse does not reproduce; remove them or "
                f"set them to their off value:\n{lines}"
            )


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    from lorafuse.config.toml_io import read_toml as read  # missing, folder, unreadable, binary: one message

    return read(path)


def parse_resolution(value: Any) -> int | list[int]:
    """512, "512", "512,768" or [512, 768] -> 512 or [512, 768] (kohya's W,H)."""
    if isinstance(value, str):
        parts = [int(p) for p in value.replace(" ", "").split(",") if p]
        value = parts[0] if len(parts) == 1 else parts
    if isinstance(value, (list, tuple)):
        if len(value) == 2 and value[0] == value[1]:
            return int(value[0])
        return [int(v) for v in value]
    return int(value)


def round_bucket_limits(imp: KohyaImport) -> None:
    """kohya rounds min_bucket_reso down and max_bucket_reso up to multiples of bucket_reso_steps (with a
    warning) where lorafuse's config refuses them; a kohya config gets kohya's rounding, shown in its table."""
    dataset = imp.data.get("dataset", {})
    tables = [("", dataset)] + [(f"subsets[{i}].", s) for i, s in enumerate(dataset.get("subsets", []))]
    for where, table in tables:
        step = int(table.get("bucket_reso_steps", dataset.get("bucket_reso_steps", 64)) or 64)
        for key in ("min_bucket_reso", "max_bucket_reso"):
            value = table.get(key)
            if not isinstance(value, int) or value % step == 0:
                continue
            rounded = max(step, value - value % step) if key.startswith("min") else value + step - value % step
            table[key] = rounded
            imp.rows.append(
                Row(
                    f"{where}{key}",
                    value,
                    "mapped",
                    f"dataset.{where}{key} = {rounded} (kohya rounds it to a multiple of bucket_reso_steps {step})",
                )
            )
