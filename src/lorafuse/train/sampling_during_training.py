"""Sample images during training: one grid per save, with the plain diffusers pipeline call.

The LoRA being trained is live in the pipeline's modules (peft layers), so the ordinary `pipe(...)` call shows
what it has learned. Sampling must not change training: it runs under `fork_rng` (the global torch stream that
LoRA dropout draws from is restored afterwards), with its own seeded generator per prompt (the same seeds at
every save, so grids compare across epochs), and puts the modules back into their training mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch

from lorafuse.families import family_of
from lorafuse.utils.images import labelled_grid, save_image, to_uint8

GUIDANCE_SCALE = 7.0  # the character-style-transfer paper's sampling setting (Chu)


def sample_grid(
    pipe,
    prompts: Sequence[str],
    out: Path,
    *,
    steps: int,
    seed: int,
    resolution: int | tuple[int, int],
    clip_skip: int | None = None,
    title: str = "",
    autocast: contextlib.AbstractContextManager | None = None,
    max_token_length: int | None = None,
) -> Path:
    """Render each prompt once (seed + prompt index) and save a labelled grid (one row per prompt) at `out`.

    With max_token_length 150 / 225 (or a prompt longer than 75 tokens) the prompts are encoded in kohya's
    75-token windows, as in training, instead of the pipeline's truncation at 77 tokens."""
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    modules = [
        m for m in (denoiser, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m
    ]
    modes = [m.training for m in modules]
    kwargs = {"clip_skip": clip_skip} if clip_skip else {}
    # classifier-free guidance at the paper's scale; a guidance-distilled family keeps its pipeline's default
    if family.default_guidance > 1:
        kwargs["guidance_scale"] = GUIDANCE_SCALE
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    images = []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast or contextlib.nullcontext():
            for m in modules:
                m.eval()
            for k, prompt in enumerate(prompts):
                generator = torch.Generator().manual_seed(seed + k)
                text = long_prompt_kwargs(pipe, prompt, max_token_length, clip_skip)
                if text:
                    kwargs.pop("clip_skip", None)  # applied while encoding
                image = pipe(
                    **(text or {"prompt": prompt}),
                    num_inference_steps=steps,
                    height=height,
                    width=width,
                    generator=generator,
                    output_type="np",
                    **kwargs,
                ).images[0]  # (H, W, 3) in [0, 1]
                images.append(to_uint8(image))
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    labels = [p if len(p) <= 40 else p[:37] + "..." for p in prompts]
    return save_image(labelled_grid([[img] for img in images], labels, ["sample"], title=title), out)


def long_prompt_kwargs(pipe, prompt: str, max_token_length: int | None, clip_skip: int | None) -> dict | None:
    """Pipeline inputs (prompt_embeds, negative_prompt_embeds, pooled for SDXL) for a prompt longer than 75 tokens
    or a run with max_token_length; None when the pipeline's own 77-token encoding is the same."""
    from lorafuse.families.long_prompts import WINDOW
    from lorafuse.train.cache import text_embeddings

    if not family_of(pipe).long_prompts:
        return None
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    encoders = [t for t in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if t is not None]
    n_tokens = len(tokenizers[0](prompt, add_special_tokens=False).input_ids)
    if not max_token_length or max_token_length <= WINDOW:
        if n_tokens <= WINDOW:
            return None
        max_token_length = min(3, -(-n_tokens // WINDOW)) * WINDOW  # kohya's sampler allows up to 225 tokens
    kohya_skip = 1 if clip_skip is None else clip_skip + 1  # diffusers' clip_skip -> kohya numbering
    cond = text_embeddings(tokenizers, encoders, [prompt, ""], kohya_skip, max_token_length)
    dtype = next(family_of(pipe).denoiser(pipe).parameters()).dtype
    states = cond["encoder_hidden_states"].to(dtype)
    out = {"prompt_embeds": states[:1], "negative_prompt_embeds": states[1:]}
    if "pooled_prompt_embeds" in cond:
        pooled = cond["pooled_prompt_embeds"].to(dtype)
        out.update(pooled_prompt_embeds=pooled[:1], negative_pooled_prompt_embeds=pooled[1:])
    return out
