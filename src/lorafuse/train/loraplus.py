"""LoRA+ (Hayou, Ghosh and Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", §3): the B factor
(kohya's lora_up, peft's lora_B) of every LoRA module trains at `ratio` times the learning rate of its A factor.
kohya's networks.lora options: loraplus_unet_lr_ratio / loraplus_text_encoder_lr_ratio per component, else
loraplus_lr_ratio for both.

Written here rather than taken from peft's `create_loraplus_optimizer`: that builds its own optimizer from a model
and one ratio, while these parameter groups already carry kohya's per-component and per-block learning rates and
a per-component ratio, so each group is split in place."""

from __future__ import annotations

from collections.abc import Mapping


def ratios(optimizer) -> tuple[float | None, float | None]:
    """(denoiser ratio, text-encoder ratio) of an OptimizerConfig, the component's own before the general one."""
    general = optimizer.loraplus_lr_ratio
    return optimizer.loraplus_unet_lr_ratio or general, optimizer.loraplus_text_encoder_lr_ratio or general


def split_groups(
    groups: list[dict], names: Mapping[int, str], unet_ratio: float | None, te_ratio: float | None
) -> list[dict]:
    """Each parameter group split in two: its A factors at the group's LR, its B factors at LR x ratio (a group
    named NAME_plus). `names` maps id(parameter) to its name (peft's `...lora_B...` for B)."""
    out = []
    for group in groups:
        ratio = te_ratio if str(group.get("name", "")).startswith("text_encoder") else unet_ratio
        if not ratio:
            out.append(group)
            continue
        plus = [p for p in group["params"] if ".lora_B." in names[id(p)]]
        rest = [p for p in group["params"] if ".lora_B." not in names[id(p)]]
        out.append({**group, "params": rest})
        if plus:
            out.append({**group, "params": plus, "lr": group["lr"] * ratio, "name": f"{group['name']}_plus"})
    return out
