"""Optimisers and learning-rate schedules by kohya's names, on maintained implementations.

AdamW: torch. AdamW8bit: bitsandbytes. Adafactor: transformers. Prodigy: prodigyopt. Schedules: diffusers'
`get_scheduler` (constant, constant_with_warmup, linear, cosine, cosine_with_restarts with hard restarts,
polynomial). Warm-up is given as steps, or as a ratio of the total when < 1 (kohya accepts both).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.optimization import get_scheduler

from lorafuse.errors import UserInputError
from lorafuse.utils.extras import require

OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor", "Prodigy")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def make_optimizer(
    name: str,
    param_groups: Iterable[dict],
    lr: float,
    weight_decay: float = 1e-2,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    groups = list(param_groups)
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas)
    if name == "AdamW8bit":
        bnb = require("bitsandbytes", "optimizer_type AdamW8bit")
        return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay, betas=betas)
    if name == "Adafactor":
        from transformers.optimization import Adafactor

        # fixed LR (relative_step=False) so the LR schedule below stays in charge, as kohya recommends
        return Adafactor(
            groups,
            lr=lr,
            weight_decay=weight_decay,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
        )
    if name == "Prodigy":
        Prodigy = require("prodigyopt", "optimizer_type Prodigy").Prodigy
        return Prodigy(groups, lr=lr, weight_decay=weight_decay, betas=betas)
    raise UserInputError(f"unknown optimizer_type {name!r}; allowed: {', '.join(OPTIMIZERS)}")


def warmup_steps(lr_warmup_steps: float, total_steps: int) -> int:
    """An int is a step count; a float in (0, 1) is a ratio of the total (kohya's convention)."""
    if 0 < lr_warmup_steps < 1:
        return int(round(lr_warmup_steps * total_steps))
    return int(lr_warmup_steps)


def make_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    lr_warmup_steps: float = 0,
    num_cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    if name not in SCHEDULES:
        raise UserInputError(f"unknown lr_scheduler {name!r}; allowed: {', '.join(SCHEDULES)}")
    kwargs = {}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = num_cycles
    if name == "polynomial":
        kwargs["power"] = power
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps(lr_warmup_steps, total_steps),
        num_training_steps=total_steps,
        **kwargs,
    )
