"""Stable Diffusion 1.x / 2.x (the SD1.5 layout): one CLIP text encoder, attention in the first down block.

B-LoRA blocks (the paper is SDXL-only; the SD1.5 choice is ours): content up_blocks.1.attentions.0, style
up_blocks.1.attentions.1. SD1.5's up_blocks.0 has no attention; up_blocks.1 is its first decoder block with
attention and runs at 1/4 of the latent size, as SDXL's up_blocks.0 does (16x16 of 64x64 latents vs 32x32 of
128x128).

CRAFT blocks. The paper's table matches neither SD1.5 nor SDXL, so we keep its stated intent with one rule:
attention blocks at the lower half of the attention resolutions (with the mid block) are content; those at the
upper half are style, plus the resnets of the highest resolution. SD1.5 has attention at latent/1, /2, /4, /8:
content /4 and /8 (down_blocks.2.attentions.0-1, mid_block, up_blocks.1.attentions.0-2); style /1 and /2
(down_blocks.0-1.attentions.*, up_blocks.2-3.attentions.*, down_blocks.0.resnets.0-1, up_blocks.3.resnets.0-2).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import nn

from lorafuse.families.layers import ATTN_PROJ, RESNET, TRANSFORMER, UNET_GENERIC, blocks, span
from lorafuse.families.unet import UNetFamily, meta_modules, unet_config

UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
)
CLIP_L = dict(  # openai/clip-vit-large-patch14 text tower
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)


class SD15(UNetFamily):
    name = "sd15"
    label = "SD1.5"
    pipeline_class = "StableDiffusionPipeline"
    default_resolution = 512
    key_layout = "sd15"
    modelspec_arch = "stable-diffusion-v1"
    ss_base_version = "sd_v1"
    tiny_bases: ClassVar = {"sd15-tiny": "tiny:tiny_sd15_pipeline"}
    reference_unet: ClassVar = UNET
    presets: ClassVar = {
        **UNET_GENERIC,
        "blora_content": blocks(ATTN_PROJ, "up_blocks.1.attentions.0"),
        "blora_style": blocks(ATTN_PROJ, "up_blocks.1.attentions.1"),
        "craft_content": blocks(
            TRANSFORMER, *span("down_blocks.2.attentions", 2), "mid_block.attentions.0", *span("up_blocks.1.attentions", 3)
        ),
        "craft_style": blocks(
            TRANSFORMER,
            *span("down_blocks.0.attentions", 2),
            *span("down_blocks.1.attentions", 2),
            *span("up_blocks.2.attentions", 3),
            *span("up_blocks.3.attentions", 3),
        )
        + blocks(RESNET, *span("down_blocks.0.resnets", 2), *span("up_blocks.3.resnets", 3)),
    }

    def matches(self, components: Mapping[str, nn.Module]) -> bool:
        config = unet_config(components)
        if config is None or "text_encoder_2" in components:
            return False
        return tuple(config.get("down_block_types", ()))[:1] == ("CrossAttnDownBlock2D",)

    def matches_checkpoint(self, keys) -> bool:
        return super().matches_checkpoint(keys) and not any(k.startswith("conditioner.embedders.1.") for k in keys)

    def reference_components(self) -> dict[str, Any]:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        return meta_modules(
            lambda: {"unet": UNet2DConditionModel(**UNET), "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L))}
        )


FAMILY = SD15()
