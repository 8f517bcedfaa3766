"""Prompt encoding for the sampling loop: the base's family encodes, this module checks and repeats rows.

Clip skip (numbering conventions in `lorafuse.families.clip`) is applied to the negative prompt as well:
diffusers encodes negatives from the default layer whatever `clip_skip` is, while A1111, ComfyUI and kohya
encode both prompts with the same layer.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from lorafuse.families import CLIP_SKIP_CONVENTIONS, Conditioning, GuidanceCond, family_of, resolve_clip_skip

__all__ = ["CLIP_SKIP_CONVENTIONS", "encode_prompts", "max_clip_skip", "resolve_clip_skip"]


def max_clip_skip(pipe: DiffusionPipeline) -> int:
    """The largest diffusers-numbered clip skip that still uses at least one transformer layer."""
    return family_of(pipe).max_clip_skip(pipe)


def encode_prompts(
    pipe: DiffusionPipeline,
    prompts: list[str],
    negative_prompts: list[str] | None,
    *,
    num_images: int,
    clip_skip: int,
    height: int,
    width: int,
) -> GuidanceCond:
    """Conditioning of `len(prompts) * num_images` images: prompt p's images are rows p*n ... p*n + n-1.

    negative_prompts: None is the family's default negative ("" for SD1.5; all-zero embeddings for SDXL
    pipelines whose config sets `force_zeros_for_empty_prompt`, following diffusers).
    """
    family = family_of(pipe)
    dtype = family.denoiser(pipe).dtype
    both = family.encode_prompts(pipe, prompts, negative_prompts, clip_skip=clip_skip, height=height, width=width)
    return GuidanceCond(_per_image(both.cond, num_images, dtype), _per_image(both.uncond, num_images, dtype))


def _per_image(c: Conditioning, num_images: int, dtype: torch.dtype) -> Conditioning:
    def rep(x: Tensor | None) -> Tensor | None:
        # (P, ...) -> (P * n, ...), each prompt's rows together, as diffusers' num_images_per_prompt
        return None if x is None else x.to(dtype).repeat_interleave(num_images, dim=0)

    return Conditioning(rep(c.embeds), rep(c.pooled), rep(c.time_ids))
