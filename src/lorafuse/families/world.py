"""The built-in world base model (`lorafuse.models.world`): SDXL's block layout at tiny size, one CLIP
encoder, no pooled or size conditioning, 64 px images.

B-LoRA blocks are SDXL's (the world UNet has SDXL's block layout). CRAFT blocks: the SDXL rule with one layer
per block: content down_blocks.2.attentions.0, mid_block, up_blocks.0.attentions.0-1; style
down_blocks.1.attentions.0, up_blocks.1.attentions.0-1, down_blocks.0.resnets.0, up_blocks.2.resnets.0-1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from torch import nn

from lorafuse.families.layers import ATTN_PROJ, RESNET, TRANSFORMER, UNET_GENERIC, blocks, span
from lorafuse.families.unet import SDXL_LAYOUT_DOWN, UNetFamily, unet_config


class World(UNetFamily):
    name = "world"
    label = "built-in world"
    pipeline_class = "StableDiffusionPipeline"
    default_resolution = 64
    key_layout = "world"
    modelspec_arch = "lorafuse-world-v1"
    ss_base_version = "lorafuse_world_v1"
    presets: ClassVar = {
        **UNET_GENERIC,
        "blora_content": blocks(ATTN_PROJ, "up_blocks.0.attentions.0"),
        "blora_style": blocks(ATTN_PROJ, "up_blocks.0.attentions.1"),
        "craft_content": blocks(
            TRANSFORMER, "down_blocks.2.attentions.0", "mid_block.attentions.0", *span("up_blocks.0.attentions", 2)
        ),
        "craft_style": blocks(TRANSFORMER, "down_blocks.1.attentions.0", *span("up_blocks.1.attentions", 2))
        + blocks(RESNET, "down_blocks.0.resnets.0", *span("up_blocks.2.resnets", 2)),
    }

    def matches(self, components: Mapping[str, nn.Module]) -> bool:
        # SDXL's block layout without SDXL's second encoder and size conditioning
        config = unet_config(components)
        if config is None or "text_encoder_2" in components or config.get("addition_embed_type") == "text_time":
            return False
        return tuple(config.get("down_block_types", ())) == SDXL_LAYOUT_DOWN

    def matches_checkpoint(self, keys) -> bool:
        return False  # the world model ships as a diffusers folder only


FAMILY = World()
