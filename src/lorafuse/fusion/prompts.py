"""Prompt encoding for SD1.5-layout pipelines (SD1.5, the built-in world model) and SDXL, with clip skip.

Clip skip is numbered differently in the two ecosystems (docs/algorithms.md §8):
- kohya sd-scripts / A1111 / ComfyUI count the layers *used from the end*: 1 = last layer (no skip),
  2 = penultimate. Values start at 1.
- diffusers counts the layers *skipped*: None or 0 = last layer, 1 = penultimate.
So kohya/A1111 `clip_skip=2` == diffusers `clip_skip=1`. Our API uses the diffusers numbering; pass
`clip_skip_convention="a1111"` to give the kohya/A1111 number instead.

For SD1.5 a skipped output still goes through the text encoder's final LayerNorm (as diffusers and A1111 do:
the last hidden state is normalised, so an earlier one must be too). SDXL already reads the penultimate layer of
both encoders without that LayerNorm, and clip skip counts from there (diffusers `hidden_states[-(k + 2)]`).

Unlike diffusers, we apply clip skip to the negative prompt as well: diffusers encodes negatives from the default
layer whatever `clip_skip` is, while A1111, ComfyUI and kohya encode both prompts with the same layer.
"""

from __future__ import annotations

import logging

import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from lorafuse.errors import UserInputError
from lorafuse.guidance.base import Conditioning, GuidanceCond

logger = logging.getLogger(__name__)

CLIP_SKIP_CONVENTIONS = ("diffusers", "a1111")


def is_sdxl(pipe: DiffusionPipeline) -> bool:
    """SDXL-style pipelines condition the UNet on pooled text and size ids ("text_time" added embedding)."""
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def resolve_clip_skip(clip_skip: int | None, convention: str = "diffusers") -> int:
    """The number of final text-encoder layers to skip (diffusers numbering, 0 = none)."""
    if convention not in CLIP_SKIP_CONVENTIONS:
        raise UserInputError(
            f"unknown clip_skip_convention {convention!r}; expected one of {', '.join(CLIP_SKIP_CONVENTIONS)}"
        )
    if clip_skip is None:
        return 0
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int):
        raise UserInputError(f"clip_skip must be an int or None, got {type(clip_skip).__name__}")
    if convention == "a1111":
        if clip_skip < 1:
            raise UserInputError(
                f"clip_skip={clip_skip} with the a1111 convention: values start at 1 (1 = last layer, "
                "2 = penultimate); for the diffusers numbering (0 = last) use clip_skip_convention='diffusers'"
            )
        return clip_skip - 1
    if clip_skip < 0:
        raise UserInputError(f"clip_skip must be >= 0 (diffusers numbering, 0 = last layer), got {clip_skip}")
    return clip_skip


def max_clip_skip(pipe: DiffusionPipeline) -> int:
    """The largest diffusers-numbered clip skip that still uses at least one transformer layer."""
    depths = [pipe.text_encoder.config.num_hidden_layers]
    if is_sdxl(pipe):
        depths.append(pipe.text_encoder_2.config.num_hidden_layers)
        return min(depths) - 2  # SDXL starts from the penultimate layer
    return depths[0] - 1


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

    negative_prompts: None means "" (SD1.5), or all-zero embeddings for SDXL pipelines whose config sets
    `force_zeros_for_empty_prompt` (as the released SDXL base does), following diffusers.
    """
    dtype = pipe.unet.dtype
    if not is_sdxl(pipe):
        cond = Conditioning(_encode_sd15(pipe, prompts, clip_skip))
        uncond = Conditioning(_encode_sd15(pipe, negative_prompts or [""] * len(prompts), clip_skip))
    else:
        # SDXL's extra conditioning: original size, crop top-left, target size (no crop, no resize).
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype).repeat(len(prompts), 1)
        cond = Conditioning(*_encode_sdxl(pipe, prompts, clip_skip), time_ids)
        if negative_prompts is None and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            uncond = Conditioning(torch.zeros_like(cond.embeds), torch.zeros_like(cond.pooled), time_ids)
        else:
            negatives = negative_prompts or [""] * len(prompts)
            uncond = Conditioning(*_encode_sdxl(pipe, negatives, clip_skip), time_ids)
    return GuidanceCond(_per_image(cond, num_images, dtype), _per_image(uncond, num_images, dtype))


def _per_image(c: Conditioning, num_images: int, dtype: torch.dtype) -> Conditioning:
    def rep(x: Tensor | None) -> Tensor | None:
        # (P, ...) -> (P * n, ...), each prompt's rows together, as diffusers' num_images_per_prompt
        return None if x is None else x.to(dtype).repeat_interleave(num_images, dim=0)

    return Conditioning(rep(c.embeds), rep(c.pooled), rep(c.time_ids))


def _tokenize(tokenizer, texts: list[str]):
    max_length = tokenizer.model_max_length
    for text in texts:
        n = len(tokenizer(text).input_ids)
        if n > max_length:
            logger.warning("prompt %r has %d tokens; CLIP reads only the first %d", text, n, max_length)
    return tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")


def _encode_sd15(pipe: DiffusionPipeline, texts: list[str], clip_skip: int) -> Tensor:
    te = pipe.text_encoder
    tokens = _tokenize(pipe.tokenizer, texts)
    ids = tokens.input_ids.to(te.device)
    # Only a few fine-tuned encoders were trained with a padding mask; CLIP itself attends to the padding.
    mask = tokens.attention_mask.to(te.device) if getattr(te.config, "use_attention_mask", False) else None
    if clip_skip == 0:
        return te(ids, attention_mask=mask)[0]  # (P, L, D), after the final LayerNorm
    hidden = te(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    # transformers 5 flattened CLIPTextModel (no `text_model` level); diffusers 0.42 still reads
    # `text_encoder.text_model.final_layer_norm` and fails (huggingface/diffusers#14124).
    return getattr(te, "text_model", te).final_layer_norm(hidden)


def _encode_sdxl(pipe: DiffusionPipeline, texts: list[str], clip_skip: int) -> tuple[Tensor, Tensor]:
    """(P, L, D1 + D2) both encoders' hidden states side by side, and (P, D2) text_encoder_2's pooled output."""
    states = []
    for tokenizer, te in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        out = te(_tokenize(tokenizer, texts).input_ids.to(te.device), output_hidden_states=True)
        states.append(out.hidden_states[-(clip_skip + 2)])
    return torch.cat(states, dim=-1), out.text_embeds
