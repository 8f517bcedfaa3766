"""Reference architectures: real-size SD1.5 / SDXL / FLUX.1 module trees built on the `meta` device.

No weights and no downloads: the configs below are the published ones (runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-xl-base-1.0, black-forest-labs/FLUX.1-dev), written out because nothing may be fetched at run time. They give
the exact module names and weight shapes a real LoRA must fit, for three uses: resolving kohya names in
files loaded without a model, guessing which architecture a foreign LoRA was made for, and checking shapes
of real files against the real architecture (the tiny test models have smaller channels).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from lorafuse.errors import UserInputError

SD15_UNET = dict(
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
SDXL_UNET = dict(
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
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
CLIP_BIGG = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)
# FLUX.1-dev transformer (schnell: the same without guidance_embeds). Its Linear shapes come from
# flux_keys.transformer_shapes, not from a meta model: building 57 blocks takes ~20 s even on meta.
FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
REFERENCE_ARCHS = ("sd15", "sdxl", "flux")
ARCH_LABELS = {"sd15": "SD1.5", "sdxl": "SDXL", "world": "built-in world", "flux": "FLUX.1"}


@functools.lru_cache(maxsize=4)
def reference_components(arch: str) -> dict[str, nn.Module]:
    """{component: module} of the real-size architecture on the meta device (about 0.3 s, cached).

    For "flux" only the CLIP-L text encoder: the transformer's modules come from `flux_keys.transformer_shapes`
    (see `targets.reference_modules`), and LoRAs on FLUX's T5 encoder are not read.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from transformers.utils import logging as hf_logging

    if arch not in REFERENCE_ARCHS:
        raise UserInputError(f"no reference architecture {arch!r}; known: {', '.join(REFERENCE_ARCHS)}")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # config sanity chatter about token ids is irrelevant on meta
    try:
        with torch.device("meta"):
            if arch == "flux":
                return {"text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L))}
            if arch == "sd15":
                return {
                    "unet": UNet2DConditionModel(**SD15_UNET),
                    "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                }
            return {
                "unet": UNet2DConditionModel(**SDXL_UNET),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)),
            }
    finally:
        hf_logging.set_verbosity(verbosity)
