"""Host the CRAFT LoRAs on the rank-limited backbone W' (docs/algorithms.md §7.1): swap W' into a loaded base.

The backbone is saved as a full diffusers pipeline (`lorafuse craft backbone`); it differs from its base only in
the UNet's tuned weights. So instead of loading a second pipeline, the plan puts the backbone's UNet tensors
into the pipeline it was given and puts the originals back on close, bit for bit (the old tensors are kept,
never recomputed). Only tensors that differ are swapped, so memory grows by the tuned layers only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorafuse.errors import UserInputError
from lorafuse.utils.inputs import shape_mismatch

BACKBONE_INFO = "craft_backbone.json"  # written next to model_index.json by the backbone trainer


def unet_folder(folder: str | os.PathLike) -> Path:
    """The UNet folder of a pipeline folder (`DIR/unet`), or DIR itself when it is a UNet folder."""
    path = Path(folder).expanduser()
    if (path / "unet" / "config.json").is_file():
        return path / "unet"
    if (path / "config.json").is_file():
        return path
    raise UserInputError(
        f"backbone {path}: not a diffusers pipeline folder with a unet/ subfolder, nor a UNet folder "
        "(no config.json); give the folder `lorafuse craft backbone` wrote"
    )


def backbone_info(folder: str | os.PathLike) -> dict[str, Any]:
    """The trainer's notes (ranks, steps, base) if the folder has them, else {}."""
    path = Path(folder) / BACKBONE_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def load_backbone_state(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_folder(folder))
    return unet.state_dict()


def swap_unet_weights(
    unet: torch.nn.Module, state: dict[str, torch.Tensor], source: str
) -> tuple[Callable[[], None], int]:
    """Put `state`'s differing tensors into `unet`'s parameters; return (undo, number swapped).

    Errors before anything changes when the two UNets differ in parameter names or shapes (a backbone trained
    from another base), naming the first differences.
    """
    params = dict(unet.named_parameters())
    buffers = {name for name, _ in unet.named_buffers()}
    problem = shape_mismatch(
        {k: t.shape for k, t in state.items() if k in params or k not in buffers},
        {k: p.shape for k, p in params.items()},
        ("{n} base tensors missing (e.g. {name})", "{n} tensors this base lacks (e.g. {name})",
         "{n} shapes differ (e.g. {name}: {got} vs {want})"),
    )  # fmt: skip
    if problem is not None:
        raise UserInputError(f"backbone {source} does not fit this base UNet: {problem}. Train the backbone from this base")
    originals: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        new = state[name].to(param.device, param.dtype)
        if not torch.equal(new, param.data):
            if not torch.isfinite(new).all():
                for done, old in originals.items():
                    params[done].data = old
                raise UserInputError(f"backbone {source}: tensor {name} has non-finite values (NaN/inf)")
            originals[name] = param.data
            param.data = new

    def undo() -> None:
        for done, old in originals.items():
            params[done].data = old
        originals.clear()

    return undo, len(originals)
