"""Optional dependencies: import them by name and, when missing, say which `lorafuse[extra]` installs them.

pip install 'lorafuse[8bit]'      bitsandbytes   (optimizer_type = AdamW8bit)
pip install 'lorafuse[prodigy]'   prodigyopt     (optimizer_type = Prodigy)
pip install 'lorafuse[lycoris]'   lycoris-lora   (network_module = lycoris.kohya)
pip install 'lorafuse[ui]'        gradio         (the web UI)
pip install 'lorafuse[quantize]'  torchao        (model.quantize_base = int8 / fp8: the frozen base in 8 bits)
pip install 'lorafuse[metrics]'   open_clip_torch (CLIP metrics with open_clip models: metrics.clip_arch)
pip install 'lorafuse[all]'       all of the above that installs on a CPU machine (not metrics: see pyproject)
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lorafuse.errors import UserInputError

# import name -> (distribution on PyPI, extra of lorafuse that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "bitsandbytes": ("bitsandbytes", "8bit"),
    "prodigyopt": ("prodigyopt", "prodigy"),
    "lycoris": ("lycoris-lora", "lycoris"),
    "gradio": ("gradio", "ui"),
    "torchao": ("torchao", "quantize"),
    "open_clip": ("open_clip_torch", "metrics"),
}
# extras left out of [all], with the reason
NOT_IN_ALL = {
    "metrics": "open_clip_torch needs torchvision, and PyPI's torchvision wheels do not load with a CPU-only torch "
    "(they break transformers' imports too); install it with the torchvision built for your torch",
}


class MissingExtraError(UserInputError):
    """An optional package is not installed; the message names the extra that installs it."""


def missing_extra_message(module: str, feature: str) -> str:
    dist, extra = EXTRAS[module]
    return f"{feature} needs the optional package {dist}, which is not installed; install it with: pip install 'lorafuse[{extra}]'"


def require(module: str, feature: str) -> ModuleType:
    """`import module`, or one `MissingExtraError` naming the extra, e.g. require("bitsandbytes", "AdamW8bit")."""
    top = module.split(".")[0]
    if top not in EXTRAS:
        raise KeyError(
            f"{top!r} is not an optional dependency of lorafuse; add it to EXTRAS and pyproject.toml"
        )
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(missing_extra_message(top, feature)) from exc
