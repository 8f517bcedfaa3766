"""SDXL base 1.0: two CLIP text encoders, pooled text and size ("text_time") conditioning.

B-LoRA blocks are the paper's: content up_blocks.0.attentions.0, style up_blocks.0.attentions.1.
CRAFT blocks (the rule of `families/sd15.py`): attention at latent/2 and /4; content /4
(down_blocks.2.attentions.0-1, mid_block, up_blocks.0.attentions.0-2); style /2 (down_blocks.1.attentions.0-1,
up_blocks.1.attentions.0-2) plus the latent/1 resnets down_blocks.0.resnets.0-1, up_blocks.2.resnets.0-2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lorafuse.errors import UserInputError
from lorafuse.families.clip import encode_penultimate_pair
from lorafuse.families.conditioning import Conditioning, GuidanceCond
from lorafuse.families.layers import ATTN_PROJ, RESNET, TRANSFORMER, UNET_GENERIC, blocks, span
from lorafuse.families.sd15 import CLIP_L
from lorafuse.families.unet import UNetFamily, meta_modules, unet_config

UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    attention_head_dim=[5, 10, 20],
    transformer_layers_per_block=[1, 2, 10],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CLIP_BIGG = dict(  # laion/CLIP-ViT-bigG-14 text tower
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)


class SDXL(UNetFamily):
    name = "sdxl"
    label = "SDXL"
    pipeline_class = "StableDiffusionXLPipeline"
    components = ("unet", "text_encoder", "text_encoder_2")
    default_resolution = 1024
    key_layout = "sdxl"
    modelspec_arch = "stable-diffusion-xl-v1-base"
    ss_base_version = "sdxl_base_v1-0"
    # kohya writes SDXL LoRAs against the SGM UNet (modelspec.implementation)
    implementation = "https://github.com/Stability-AI/generative-models"
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    uses_clip_skip = False  # SDXL reads the penultimate layer of both encoders, as kohya's sdxl trainer
    kohya_sgm_unet = True  # kohya's SDXL files name the SGM UNet (input_blocks, middle_block, output_blocks)
    reference_unet: ClassVar = UNET
    kohya_prefixes: ClassVar = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    tiny_bases: ClassVar = {"sdxl-tiny": "tiny:tiny_sdxl_pipeline"}
    presets: ClassVar = {
        **UNET_GENERIC,
        "blora_content": blocks(ATTN_PROJ, "up_blocks.0.attentions.0"),
        "blora_style": blocks(ATTN_PROJ, "up_blocks.0.attentions.1"),
        "craft_content": blocks(
            TRANSFORMER, *span("down_blocks.2.attentions", 2), "mid_block.attentions.0", *span("up_blocks.0.attentions", 3)
        ),
        "craft_style": blocks(TRANSFORMER, *span("down_blocks.1.attentions", 2), *span("up_blocks.1.attentions", 3))
        + blocks(RESNET, *span("down_blocks.0.resnets", 2), *span("up_blocks.2.resnets", 3)),
    }

    def matches(self, components: Mapping[str, nn.Module]) -> bool:
        config = unet_config(components)
        if config is None:
            return False
        return "text_encoder_2" in components or config.get("addition_embed_type") == "text_time"

    def matches_checkpoint(self, keys) -> bool:
        return super().matches_checkpoint(keys) and any(k.startswith("conditioner.embedders.1.") for k in keys)

    def check_pipeline(self, pipe: Any, embedded_guidance: float | None) -> None:
        super().check_pipeline(pipe, embedded_guidance)
        if any(getattr(pipe, n, None) is None for n in ("text_encoder", "text_encoder_2")):
            raise UserInputError("SDXL sampling needs both text encoders (the refiner, with only one, is not supported)")

    def max_clip_skip(self, pipe: Any) -> int:
        depths = [pipe.text_encoder.config.num_hidden_layers, pipe.text_encoder_2.config.num_hidden_layers]
        return min(depths) - 2  # SDXL starts from the penultimate layer

    def encode_prompts(
        self, pipe: Any, prompts: list[str], negatives: list[str] | None, *, clip_skip: int, height: int, width: int
    ) -> GuidanceCond:
        """negatives None: all-zero embeddings when the config sets `force_zeros_for_empty_prompt` (as the released
        SDXL base does), following diffusers; else ""."""
        # SDXL's extra conditioning: original size, crop top-left, target size (no crop, no resize).
        time_ids = torch.tensor([[height, width, 0, 0, height, width]]).repeat(len(prompts), 1)
        cond = Conditioning(*encode_penultimate_pair(pipe, prompts, clip_skip), time_ids)
        if negatives is None and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            uncond = Conditioning(torch.zeros_like(cond.embeds), torch.zeros_like(cond.pooled), time_ids)
        else:
            uncond = Conditioning(*encode_penultimate_pair(pipe, negatives or [""] * len(prompts), clip_skip), time_ids)
        return GuidanceCond(cond, uncond)

    def training_cond(self, text: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Conditioning:
        """The pooled text embedding and the (B, 6) size ids of each image: original size, crop top-left and
        target size, (h, w) each, as kohya's sdxl trainer builds them."""
        ids = [
            [*o, *c, *t]
            for o, c, t in zip(batch["original_size"], batch["crop_top_left"], batch["target_size"], strict=True)
        ]
        pooled = text["pooled_prompt_embeds"]
        time_ids = torch.tensor(ids, device=pooled.device, dtype=pooled.dtype)
        return Conditioning(text["encoder_hidden_states"], pooled, time_ids)

    def reference_components(self) -> dict[str, Any]:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        return meta_modules(
            lambda: {
                "unet": UNet2DConditionModel(**UNET),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)),
            }
        )


FAMILY = SDXL()
