"""B-LoRA (Frenkel et al., ECCV 2024; docs/algorithms.md §4): content from one block, style from another.

A B-LoRA is trained on one image, restricted to the attention projections of two UNet blocks at once; the paper
finds the first carries the image's content and the second its style. Fusion takes the content block's update
from image A's LoRA and the style block's update from image B's, and nothing else:

    W_l ← W_l + w_c ΔW_c,l   for l in the content block's projections (to_q, to_k, to_v, to_out.0)
    W_l ← W_l + w_s ΔW_s,l   for l in the style block's projections
    every other weight stays the base's, whatever else the two LoRAs cover.

Notation map: `content` is LoRA A (ΔW_c), `style` LoRA B (ΔW_s), `content_weight` w_c, `style_weight` w_s.

Blocks, per architecture (from `lorafuse.lora.presets`, layer presets `blora_content` / `blora_style`):
    sdxl, world  up_blocks.0.attentions.0 (content), up_blocks.0.attentions.1 (style): the paper's blocks; the
                 built-in world UNet has SDXL's block layout.
    sd15         up_blocks.1.attentions.0 / .1. The paper is SDXL-only and SD1.5's up_blocks.0 has no attention;
                 up_blocks.1 is SD1.5's first decoder block with attention and runs at 1/4 of the latent size,
                 as SDXL's up_blocks.0 does, so it is the closest counterpart (our choice, not the paper's).
Users may name other blocks (`content_blocks`, `style_blocks`); the two sets must be disjoint.

Scaling: ΔW scales LINEARLY with the user's weight (weight 0.5 gives half the update). The official inference
code multiplies both factors A and B by the weight, so its ΔW scales by w² (and a negative weight acts like a
positive one); `scaling="official_quadratic"` reproduces that for comparison.

Cost: the two block updates are fused into the weights (exact, rank-concatenated), so sampling costs what the
base model costs; `plan.close()` restores the replaced tensors exactly.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass
from typing import Any

from lorafuse.errors import LoraFormatError, UserInputError
from lorafuse.fusion.common import (
    fuse_sum,
    lora_label,
    resolve,
    split_state,
)
from lorafuse.fusion.registry import (
    FusionConfig,
    FusionMethod,
    FusionPlan,
    check_choice,
    register,
)
from lorafuse.lora.presets import ATTN_PROJ, block_names, detect_arch, preset_rules
from lorafuse.lora.state import LoraState
from lorafuse.lora.validate import LoraCoverageWarning

NAME = "blora"
SCALINGS = ("linear", "official_quadratic")


@dataclass
class BLoraConfig(FusionConfig):
    """scaling: "linear" (ΔW ∝ w) or "official_quadratic" (ΔW ∝ w², the official code).
    content_blocks / style_blocks: UNet block paths such as "up_blocks.0.attentions.0"; None = the preset."""

    scaling: str = "linear"
    content_blocks: tuple[str, ...] | None = None
    style_blocks: tuple[str, ...] | None = None

    def validate(self, method: str) -> None:
        super().validate(method)
        check_choice(method, "scaling", self.scaling, SCALINGS)
        for name in ("content_blocks", "style_blocks"):
            blocks = getattr(self, name)
            if blocks is None:
                continue
            if isinstance(blocks, str) or not blocks or not all(isinstance(b, str) for b in blocks):
                raise UserInputError(
                    f"{method}: option {name} must be a non-empty list of block paths "
                    f"(e.g. ['up_blocks.0.attentions.0']), got {blocks!r}"
                )
        if self.content_blocks and self.style_blocks:
            shared = sorted(set(self.content_blocks) & set(self.style_blocks))
            if shared:
                raise UserInputError(
                    f"{method}: blocks {shared} are in both content_blocks and style_blocks; they must be disjoint"
                )


def blora_blocks(pipe: Any, config: BLoraConfig | None = None) -> tuple[list[str], list[str]]:
    """(content blocks, style blocks) of `pipe`: the config's, else the architecture's preset."""
    arch = detect_arch(pipe)
    content = list(config.content_blocks) if config and config.content_blocks else None
    style = list(config.style_blocks) if config and config.style_blocks else None
    content = content or [block for block, _, _ in preset_rules("blora_content", arch)]
    style = style or [block for block, _, _ in preset_rules("blora_style", arch)]
    existing = block_names(pipe)
    for block in (*content, *style):
        if block not in existing:
            close = difflib.get_close_matches(block, existing, n=4, cutoff=0.5)
            hint = f"; closest blocks of this base: {', '.join(close)}" if close else ""
            raise UserInputError(f"{NAME}: the {arch} UNet has no block {block!r}{hint}")
    return content, style


def _block_of(path: str, blocks: list[str]) -> str | None:
    for block in blocks:
        if re.fullmatch(rf"{re.escape(block)}\.{ATTN_PROJ}", path):
            return block
    return None


def route(pipe: Any, state: LoraState, blocks: list[str], role: str) -> tuple[LoraState, dict[str, Any]]:
    """The part of `state` inside `blocks`' attention projections, and what was kept and dropped.

    A block the LoRA does not touch at all is an error naming the file, the method and the block: fusing would
    silently give the base there ("B-LoRA did nothing"). A block covered only in part is a warning.
    """
    label = lora_label(state, role)
    targets = resolve(pipe, state)
    per_block: dict[str, list[str]] = {block: [] for block in blocks}
    kept = []
    for key, ref in targets.items():
        block = _block_of(ref.path, blocks) if ref.component == "unet" else None
        if block is not None:
            kept.append(key)
            per_block[block].append(ref.path)
    for block, covered in per_block.items():
        needed = [
            p for p, _ in pipe.unet.get_submodule(block).named_modules(prefix=block) if _block_of(p, [block])
        ]
        if not needed:
            raise UserInputError(
                f"{NAME}: block {block} has no attention projections (to_q, to_k, to_v, to_out.0)"
            )
        if not covered:
            unet_keys = sum(ref.component == "unet" for ref in targets.values())
            raise LoraFormatError(
                f"{label}: {NAME} takes the {role} from block {block} (attention projections to_q, to_k, to_v, "
                f"to_out.0), but this LoRA has no module there (it covers {unet_keys} other UNet modules). "
                f"Use a B-LoRA trained with layer preset blora_{role}, or name the block with {role}_blocks=..."
            )
        missing = sorted(set(needed) - set(covered))
        if missing:
            warnings.warn(
                f"{label}: {NAME} {role} block {block}: the LoRA covers {len(covered)} of its {len(needed)} "
                f"attention projections (missing e.g. {missing[0]})",
                LoraCoverageWarning,
                stacklevel=3,
            )
    info = {"kept_modules": len(kept), "dropped_modules": len(state.modules) - len(kept)}
    return split_state(state, kept), info


def effective_weight(weight: float, scaling: str) -> float:
    """ΔW multiplier for a user weight: w, or w² as the official code (A and B each scaled by w)."""
    return weight * weight if scaling == "official_quadratic" else weight


def blora_parts(
    pipe: Any, content: LoraState, style: LoraState, config: BLoraConfig
) -> tuple[list[tuple[LoraState, float]], dict[str, Any]]:
    """[(content block part of A, w_c'), (style block part of B, w_s')] with the effective weights, and a
    record of the routing. Fusing the parts' weighted sum is the whole method."""
    content_blocks, style_blocks = blora_blocks(pipe, config)
    overlap = sorted(set(content_blocks) & set(style_blocks))
    if overlap:
        raise UserInputError(
            f"{NAME}: blocks {overlap} are both content and style blocks; they must be disjoint"
        )
    content_part, content_info = route(pipe, content, content_blocks, "content")
    style_part, style_info = route(pipe, style, style_blocks, "style")
    w_c = effective_weight(config.content_weight, config.scaling)
    w_s = effective_weight(config.style_weight, config.scaling)
    record = {
        "content_blocks": content_blocks,
        "style_blocks": style_blocks,
        "content": content_info,
        "style": style_info,
        "effective_weights": [w_c, w_s],
    }
    return [(content_part, w_c), (style_part, w_s)], record


@register
class BLora(FusionMethod):
    name = NAME
    config_cls = BLoraConfig
    paper_inputs = ("blora", {})  # one LoRA on the two blocks, trained jointly (the paper's training)
    summary = (
        "B-LoRA: content block of LoRA A + style block of LoRA B (attention projections only), fused into the "
        "weights; linear in the weight (official code: quadratic)"
    )

    def _build(self, plan: FusionPlan, pipe: Any, content: LoraState, style: LoraState, config: BLoraConfig) -> None:
        parts, routing = blora_parts(pipe, content, style, config)
        plan.record.update(routing, arch=detect_arch(pipe))
        plan.record.update(fuse_sum(pipe, parts, plan.undo))
