"""LoRA Switch (Multi-LoRA Composition, Zhong et al. 2024; docs/algorithms.md §3): one LoRA active at a time,
rotating every τ steps: at step i the active LoRA is a = (i // τ) mod N, LoRAs ordered (content, style).

Notation: `tau` is τ (5 in the paper); `w_c` / `w_s` the weights the active LoRA is applied with.
The UNet part switches (mechanism "swap": precomputed fused weights, base-model speed; or "adapter"); prompts are
encoded once before step 0, so the text-encoder parts of both LoRAs act together, fused as w_c ΔW_c + w_s ΔW_s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from lorafuse.errors import UserInputError
from lorafuse.fusion.common import (
    forward_order,
    fuse_sum,
    is_denoiser,
    resolve,
    split_state,
)
from lorafuse.fusion.registry import FusionConfig, FusionMethod, FusionPlan, register
from lorafuse.fusion.variants import BASE, MECHANISMS, LayerVariants, make_variants
from lorafuse.guidance.schedules import switch_index
from lorafuse.lora.state import LoraState
from lorafuse.lora.targets import ModuleRef

ADAPTER_NAMES = ("switch_content", "switch_style")


@dataclass
class SwitchConfig(FusionConfig):
    tau: int = 5
    mechanism: Literal["auto", "swap", "adapter", "inplace"] = "auto"

    def validate(self, method: str) -> None:
        super().validate(method)
        if isinstance(self.tau, bool) or not isinstance(self.tau, int) or self.tau < 1:
            raise UserInputError(
                f"{method}: option tau={self.tau!r} must be an integer >= 1 (steps per LoRA)"
            )
        if self.mechanism not in MECHANISMS:
            raise UserInputError(f"{method}: option mechanism={self.mechanism!r} must be 'auto', 'swap', 'adapter' or 'inplace'")


class SwitchHook:
    """Before step i, every switched layer takes LoRA (i // τ) mod N."""

    def __init__(self, variants: LayerVariants, tau: int, n: int, record: dict[str, Any]) -> None:
        self.variants, self.tau, self.n, self.record = variants, tau, n, record

    def before_step(self, step_index: int, num_steps: int, unet: torch.nn.Module) -> None:
        if step_index == 0:
            self.record["active"] = [switch_index(i, self.tau, self.n) for i in range(num_steps)]
        self.variants.select_all(switch_index(step_index, self.tau, self.n))

    def after_sampling(self, unet: torch.nn.Module) -> None:
        self.variants.select_all(BASE)

    def __repr__(self) -> str:
        return f"SwitchHook(tau={self.tau}, n={self.n})"


def unet_variants(
    pipe: Any, content: LoraState, style: LoraState, config: FusionConfig, names: tuple[str, str],
    record: dict[str, Any], undo: list,
) -> LayerVariants:  # fmt: skip
    """Fuse the non-UNet parts as a sum and build switchable UNet variants (content = 0, style = 1)."""
    refs_c, refs_s = resolve(pipe, content), resolve(pipe, style)
    unet_c = {k: r for k, r in refs_c.items() if is_denoiser(r)}
    unet_s = {k: r for k, r in refs_s.items() if is_denoiser(r)}
    others = [
        (split_state(content, set(refs_c) - set(unet_c)), config.content_weight),
        (split_state(style, set(refs_s) - set(unet_s)), config.style_weight),
    ]
    record.update(fuse_sum(pipe, others, undo))
    layers: list[ModuleRef] = forward_order(pipe, set(unet_c.values()) | set(unet_s.values()))
    variants = make_variants(
        config.mechanism, pipe, layers,
        [(content, unet_c, config.content_weight), (style, unet_s, config.style_weight)], names,
    )  # fmt: skip
    undo.append(variants.close)
    record["switched_layers"] = len(layers)
    record["mechanism"] = variants.mechanism  # "auto" resolved
    return variants


@register
class Switch(FusionMethod):
    name = "switch"
    config_cls = SwitchConfig
    summary = "LoRA Switch: one LoRA active at a time, rotating every tau steps"

    def _build(self, plan: FusionPlan, pipe: Any, content: LoraState, style: LoraState, config: SwitchConfig) -> None:
        plan.record.update({
            "tau": config.tau, "order": ["content", "style"], "mechanism": config.mechanism,
            "content_weight": config.content_weight, "style_weight": config.style_weight,
        })  # fmt: skip
        variants = unet_variants(pipe, content, style, config, ADAPTER_NAMES, plan.record, plan.undo)
        plan.hooks.append(SwitchHook(variants, config.tau, 2, plan.record))
