"""lorafuse: train, fuse and measure subject and style LoRAs for diffusion models."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Imported on first use: `import lorafuse` (and `lorafuse --help`) must not pay for torch and diffusers.
_LAZY = {"fuse": "lorafuse.fusion.api", "FuseResult": "lorafuse.fusion.api"}
__all__ = ["FuseResult", "__version__", "fuse"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorafuse' has no attribute {name!r}")
