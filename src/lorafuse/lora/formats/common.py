"""Pieces shared by the format readers and writers."""

from __future__ import annotations

import torch

from lorafuse.errors import LoraFormatError
from lorafuse.lora.state import LoraModule

DAMAGED = "the file is damaged or was written by a tool lorafuse does not read; re-export the LoRA"


def lora_pair(down: torch.Tensor, up: torch.Tensor, alpha: float | None, where: str) -> LoraModule:
    """A (down, up, alpha) module after checking that the two factors fit together."""
    if down.dim() not in (2, 4) or up.dim() not in (2, 4):
        raise LoraFormatError(f"{where}: down {tuple(down.shape)} / up {tuple(up.shape)} are not 2-D or 4-D; {DAMAGED}")
    if down.shape[0] != up.shape[1]:
        raise LoraFormatError(
            f"{where}: rank mismatch, down has {down.shape[0]} rows (shape {tuple(down.shape)}) but up has "
            f"{up.shape[1]} columns (shape {tuple(up.shape)}); {DAMAGED}"
        )
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise LoraFormatError(f"{where}: conv up factor must be 1x1, got {tuple(up.shape)}; {DAMAGED}")
    if 0 in down.shape or 0 in up.shape:  # rank 0 or an empty layer: alpha / rank would divide by zero
        raise LoraFormatError(
            f"{where}: empty factor (down {tuple(down.shape)}, up {tuple(up.shape)}); a LoRA module needs rank >= 1 "
            "and non-empty layers. The file is damaged; remove the module or re-export the LoRA."
        )
    return LoraModule(down=down, up=up, alpha=alpha)


def effective_alpha(module: LoraModule) -> float:
    """alpha with the "missing means rank" convention applied (what every writer stores)."""
    return float(module.alpha) if module.alpha is not None else float(module.rank)


def require_low_rank(key: str, module: LoraModule, fmt: str) -> None:
    if module.down is None or module.up is None:
        raise LoraFormatError(
            f"{key}: this module is a dense ΔW (rebuilt from LyCORIS LoHa/LoKr); the {fmt} format stores "
            "only (down, up) pairs. Reduce it to a low-rank LoRA first (SVD), then save."
        )
