"""Small validators for config dataclasses: messages start with the field name; the loader adds file and table."""

from __future__ import annotations

from pathlib import Path

from lorafuse.errors import ConfigError


def bad(key: str, message: str) -> ConfigError:
    return ConfigError(f"{key}: {message}")


def check_positive(obj: object, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value is not None and value <= 0:
            raise bad(key, f"must be positive, got {value}")


def check_rates(obj: object, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if not 0.0 <= value <= 1.0:
            raise bad(key, f"must be in [0, 1], got {value}")


def as_paths(obj: object, *keys: str) -> None:
    """Accept str for Path fields in frozen dataclasses, so `DatasetConfig(train_data_dir="d")` equals a loaded one."""
    for key in keys:
        value = getattr(obj, key)
        if isinstance(value, str):
            object.__setattr__(obj, key, Path(value))
