"""LoRA Composite (Multi-LoRA Composition, Zhong et al. 2024; docs/algorithms.md §3): at every step each LoRA a runs
the CFG batch with only a active, and the guided predictions are averaged:
    ε̂ = mean_a [ε_u^a + g (ε_c^a − ε_u^a)]          (`guidance.CompositeGuidance`)
Costs N guided forwards per step (N = 2: content, style). Notation: `w_c` / `w_s` scale each LoRA's ΔW in its
own forward. As in Switch, the UNet part is what alternates (mechanism "swap": precomputed fused weights, a
pointer swap around each forward; or "adapter"); the text-encoder parts act together as w_c ΔW_c + w_s ΔW_s,
since prompts are encoded once before step 0.

`official=True` scales every LoRA by 0.8 as the official code does (maszhongming/Multi-LoRA-Composition,
`compose_lora.py --lora_scale 0.8`, which also reaches the text encoders through diffusers' lora scale); its
prompt is encoded with all LoRAs active, as ours is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from lorafuse.fusion.registry import FusionConfig, FusionMethod, FusionPlan, register
from lorafuse.fusion.switch import check_switching, record_switching, unet_variants
from lorafuse.fusion.variants import BASE, LayerVariants
from lorafuse.guidance.cfg import ClassifierFreeGuidance, CompositeGuidance
from lorafuse.lora.state import LoraState

ADAPTER_NAMES = ("composite_content", "composite_style")


@dataclass
class CompositeConfig(FusionConfig):
    mechanism: Literal["auto", "swap", "adapter", "inplace"] = "auto"
    official: bool = False  # every LoRA at scale 0.8, as the official code

    def validate(self, method: str) -> None:
        super().validate(method)
        check_switching(method, self.official, self.mechanism)


def only(variants: LayerVariants, variant: int) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """A context factory: inside, every switched layer applies LoRA `variant` only; outside, the base."""

    @contextlib.contextmanager
    def active() -> Iterator[None]:
        variants.select_all(variant)
        try:
            yield
        finally:
            variants.select_all(BASE)

    return active


@register
class Composite(FusionMethod):
    name = "composite"
    config_cls = CompositeConfig
    paper_inputs = ("locon", {"official": True})  # community LoRAs of every layer, run as the official code
    summary = "LoRA Composite: each LoRA's guided prediction every step, averaged (N forwards per step)"

    def _build(self, plan: FusionPlan, pipe: Any, content: LoraState, style: LoraState, config: CompositeConfig
               ) -> None:  # fmt: skip
        config = record_switching(plan, config)
        variants = unet_variants(pipe, content, style, config, ADAPTER_NAMES, plan.record, plan.undo)
        contexts = [only(variants, 0), only(variants, 1)]
        plan.guidance = lambda scale: CompositeGuidance(ClassifierFreeGuidance(scale), contexts)
