"""Direct merge (docs/algorithms.md §1, Chu, character style transfer, §3.3.2 "1:1 mix"): ΔW = w_c ΔW_c + w_s ΔW_s, exactly.

Notation: `delta_c` is ΔW_c = s_c B_c A_c, `delta_s` is ΔW_s, `w_c` / `w_s` the options content_weight /
style_weight. The sum is one rank-concatenated LoRA (`lora.merge.merge_loras`, no cross terms B_c A_s, unlike
kohya's merge_lora.py), fused into the base weights, so sampling costs exactly what the base model costs.
`plan.close()` puts the original weight tensors back (bit for bit; nothing is subtracted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorafuse.fusion.common import fuse_sum
from lorafuse.fusion.registry import FusionConfig, FusionMethod, FusionPlan, register
from lorafuse.lora.state import LoraState


@dataclass
class DirectConfig(FusionConfig):
    """content_weight w_c and style_weight w_s (each in [-4, 4]); ΔW = w_c ΔW_c + w_s ΔW_s."""


@register
class Direct(FusionMethod):
    name = "direct"
    config_cls = DirectConfig
    summary = "exact weighted sum w_c ΔW_c + w_s ΔW_s, fused into the weights (base-model speed)"

    def _build(self, plan: FusionPlan, pipe: Any, content: LoraState, style: LoraState, config: DirectConfig) -> None:
        parts = [(content, config.content_weight), (style, config.style_weight)]
        plan.record.update(fuse_sum(pipe, parts, plan.undo))
        plan.record.update(content_weight=config.content_weight, style_weight=config.style_weight)
