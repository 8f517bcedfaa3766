"""Option checks and records shared by the B-LoRA, ZipLoRA and NP-LoRA configs.

Errors name the method and the option, as `registry.make_config` does for unknown options.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from lorafuse.errors import UserInputError
from lorafuse.fusion.registry import FusionConfig


def check_range(method: str, name: str, value: float, lo: float, hi: float, *, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        what = "an integer" if integer else "a finite number"
        raise UserInputError(f"{method}: option {name} must be {what}, got {value!r}")
    if not lo <= value <= hi:
        raise UserInputError(f"{method}: option {name}={value} is out of range [{lo}, {hi}]")


def check_choice(method: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserInputError(f"{method}: option {name}={value!r}; choose from {', '.join(choices)}")


def config_record(config: FusionConfig) -> dict[str, Any]:
    """JSON-ready settings: plain values as they are; tensors, images and other objects by type name only."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None or isinstance(value, (bool, int, float, str)):
            out[f.name] = value
        elif isinstance(value, Path):
            out[f.name] = str(value)
        elif isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
            out[f.name] = list(value)
        else:
            out[f.name] = f"<{type(value).__name__}>"
    return out
