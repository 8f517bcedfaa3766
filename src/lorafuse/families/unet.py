"""The UNet families' shared parts: the denoiser call, detection by UNet config, SD1.5-layout prompt encoding.

SD1.5, SDXL and the built-in world model are `UNetFamily`s; they differ in detection, presets, metadata and
(SDXL) the pooled text and size conditioning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lorafuse.errors import UserInputError
from lorafuse.families.base import Family
from lorafuse.families.clip import encode_last_normed, kohya_clip_embeddings
from lorafuse.families.conditioning import Conditioning, GuidanceCond
from lorafuse.families.layers import UNET_BLOCK

SDXL_LAYOUT_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")


@dataclass(frozen=True)
class UNetDenoiser:
    """`ModelFn` over a diffusers `UNet2DConditionModel`. `unet` is public so guidance policies can reach it,
    e.g. to enable per-sample adapters around the call."""

    unet: nn.Module

    @property
    def module(self) -> nn.Module:
        return self.unet

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if len(x) != len(cond):
            raise ValueError(f"{len(x)} latent rows but {len(cond)} conditioning rows")
        return self.unet(x, t, **unet_kwargs(cond), return_dict=False)[0]


def unet_kwargs(cond: Conditioning) -> dict[str, Any]:
    """A UNet's conditioning keywords: SDXL's pooled text and size ids go in `added_cond_kwargs`."""
    kwargs: dict[str, Any] = {"encoder_hidden_states": cond.embeds}
    if cond.time_ids is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    return kwargs


def unet_config(components: Mapping[str, nn.Module]) -> Mapping[str, Any] | None:
    unet = components.get("unet")
    config = getattr(unet, "config", None)
    return config if config is not None and "down_block_types" in config else None


class UNetFamily(Family):
    """A Stable-Diffusion-architecture family (UNet2DConditionModel + CLIP text encoders)."""

    block_pattern: ClassVar[str] = UNET_BLOCK

    def model_fn(
        self, denoiser: nn.Module, *, height: int, width: int, embedded_guidance: float | None = None
    ) -> UNetDenoiser:
        return UNetDenoiser(denoiser)

    def check_pipeline(self, pipe: Any, embedded_guidance: float | None) -> None:
        super().check_pipeline(pipe, embedded_guidance)
        if self.denoiser(pipe).config.time_cond_proj_dim is not None:
            raise UserInputError("UNets with a guidance embedding (LCM, time_cond_proj_dim) are not supported")

    def max_clip_skip(self, pipe: Any) -> int:
        return pipe.text_encoder.config.num_hidden_layers - 1

    def encode_prompts(
        self, pipe: Any, prompts: list[str], negatives: list[str] | None, *, clip_skip: int, height: int, width: int
    ) -> GuidanceCond:
        cond = Conditioning(encode_last_normed(pipe.text_encoder, pipe.tokenizer, prompts, clip_skip))
        negatives = negatives or [""] * len(prompts)
        uncond = Conditioning(encode_last_normed(pipe.text_encoder, pipe.tokenizer, negatives, clip_skip))
        return GuidanceCond(cond, uncond)

    def matches_checkpoint(self, keys) -> bool:
        return any(k.startswith("model.diffusion_model.") for k in keys)

    def training_text(
        self, tokenizers, encoders, captions, *, clip_skip, max_token_length, t5_max_length=None
    ) -> dict[str, Tensor]:
        # kohya's CLIP encoding (clip skip through the final LayerNorm; SDXL's penultimate pair and pooled output)
        return kohya_clip_embeddings(tokenizers, encoders, captions, clip_skip, max_token_length)


def meta_modules(build: Any) -> Any:
    """Build modules on the meta device with transformers' config chatter silenced (token ids on meta)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            return build()
    finally:
        hf_logging.set_verbosity(verbosity)
