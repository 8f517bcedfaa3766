"""LoRA Switch (Multi-LoRA Composition, Zhong et al. 2024; docs/algorithms.md §3): one LoRA active at a time,
rotating every τ steps: at step i the active LoRA is a = (i // τ) mod N, LoRAs ordered (content, style).

Notation: `tau` is τ (5 in the paper); `w_c` / `w_s` the weights the active LoRA is applied with.
The UNet part switches (mechanism "swap": precomputed fused weights, base-model speed; or "adapter"); prompts are
encoded once before step 0, so the text-encoder parts of both LoRAs act together, fused as w_c ΔW_c + w_s ΔW_s.

`official=True` runs it as the official code (maszhongming/Multi-LoRA-Composition, `callbacks.py`,
`compose_lora.py`) does, which differs from the paper's description in three ways:
- the switch happens in a step-end callback at `i > 0 and i % τ == 0`, so LoRA 0 (content) runs the first τ + 1
  steps and every later segment τ steps (`guidance.schedules.switch_index_official`);
- every LoRA is applied at scale 0.8 (`--lora_scale 0.8`), i.e. ΔW is multiplied by 0.8 w;
- only LoRA 0 is active when the prompt is encoded, so the text encoders get 0.8 w_c ΔW_c and nothing of the
  style LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
from lorafuse.guidance.schedules import switch_index, switch_index_official
from lorafuse.lora.state import LoraState
from lorafuse.lora.targets import ModuleRef

ADAPTER_NAMES = ("switch_content", "switch_style")
OFFICIAL_SCALE = 0.8  # compose_lora.py --lora_scale default: every LoRA at 0.8


@dataclass
class SwitchConfig(FusionConfig):
    tau: int = 5
    mechanism: Literal["auto", "swap", "adapter", "inplace"] = "auto"
    official: bool = False  # run as the official code: τ + 1 first segment, scale 0.8, prompt with LoRA 0 only

    def validate(self, method: str) -> None:
        super().validate(method)
        check_switching(method, self.official, self.mechanism)
        if isinstance(self.tau, bool) or not isinstance(self.tau, int) or self.tau < 1:
            raise UserInputError(
                f"{method}: option tau={self.tau!r} must be an integer >= 1 (steps per LoRA)"
            )


def check_switching(method: str, official: object, mechanism: object) -> None:
    """The options Switch and Composite share: `official` true or false, `mechanism` one of MECHANISMS."""
    if not isinstance(official, bool):
        raise UserInputError(f"{method}: option official={official!r} must be true or false")
    if mechanism not in MECHANISMS:
        raise UserInputError(f"{method}: option mechanism={mechanism!r} must be 'auto', 'swap', 'adapter' or 'inplace'")


def record_switching(plan: FusionPlan, config: Any, **first: Any) -> Any:
    """Records `first`, then the options Switch and Composite share; returns the config the LoRAs are applied
    with (the official code's weights when `official`)."""
    plan.record.update({
        **first, "order": ["content", "style"], "mechanism": config.mechanism,
        "content_weight": config.content_weight, "style_weight": config.style_weight, "official": config.official,
    })  # fmt: skip
    return official_weights(config) if config.official else config


class SwitchHook:
    """Before step i, every switched layer takes LoRA (i // τ) mod N (official: max(i − 1, 0) // τ mod N)."""

    def __init__(self, variants: LayerVariants, tau: int, n: int, record: dict[str, Any], official: bool = False
                 ) -> None:  # fmt: skip
        self.variants, self.tau, self.n, self.record = variants, tau, n, record
        self.index = switch_index_official if official else switch_index

    def before_step(self, step_index: int, num_steps: int, unet: torch.nn.Module) -> None:
        if step_index == 0:
            self.record["active"] = [self.index(i, self.tau, self.n) for i in range(num_steps)]
        self.variants.select_all(self.index(step_index, self.tau, self.n))

    def after_sampling(self, unet: torch.nn.Module) -> None:
        self.variants.select_all(BASE)

    def __repr__(self) -> str:
        return f"SwitchHook(tau={self.tau}, n={self.n})"


def unet_variants(
    pipe: Any, content: LoraState, style: LoraState, config: FusionConfig, names: tuple[str, str],
    record: dict[str, Any], undo: list, text_style_weight: float | None = None,
) -> LayerVariants:  # fmt: skip
    """Fuse the non-UNet parts as a sum and build switchable UNet variants (content = 0, style = 1).
    text_style_weight: the style LoRA's weight in the text encoders (default: the config's style_weight)."""
    refs_c, refs_s = resolve(pipe, content), resolve(pipe, style)
    unet_c = {k: r for k, r in refs_c.items() if is_denoiser(r)}
    unet_s = {k: r for k, r in refs_s.items() if is_denoiser(r)}
    others = [
        (split_state(content, set(refs_c) - set(unet_c)), config.content_weight),
        (split_state(style, set(refs_s) - set(unet_s)),
         config.style_weight if text_style_weight is None else text_style_weight),
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
    paper_inputs = ("locon", {"official": True})  # community LoRAs of every layer, run as the official code
    summary = "LoRA Switch: one LoRA active at a time, rotating every tau steps"

    def _build(self, plan: FusionPlan, pipe: Any, content: LoraState, style: LoraState, config: SwitchConfig) -> None:
        config = record_switching(plan, config, tau=config.tau)
        variants = unet_variants(pipe, content, style, config, ADAPTER_NAMES, plan.record, plan.undo,
                                 text_style_weight=0.0 if config.official else None)  # fmt: skip
        plan.hooks.append(SwitchHook(variants, config.tau, 2, plan.record, official=config.official))


def official_weights(config: FusionConfig) -> FusionConfig:
    """The config with both weights times 0.8, the official code's LoRA scale."""
    return replace(config, content_weight=OFFICIAL_SCALE * config.content_weight,
                   style_weight=OFFICIAL_SCALE * config.style_weight)  # fmt: skip
