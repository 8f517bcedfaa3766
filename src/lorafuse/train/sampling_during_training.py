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
from lorafuse.train.kohya_prompts import split_negative
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

    A prompt longer than 75 tokens, with (word:1.2) weights or A1111's BREAK is encoded as kohya's sampler does
    (families/sample_text.py) instead of the pipeline's truncation at 77 tokens."""
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
    # CPU autocast (mixed_precision fp16 / bf16 without CUDA) leaves convolutions uncast: the half-precision
    # latents would meet the float32 VAE decoder; its entry modules take their input in their own dtype
    vae = getattr(pipe, "vae", None)
    entries = [m for m in (getattr(vae, "post_quant_conv", None), getattr(vae, "decoder", None)) if m is not None]
    hooks = [m.register_forward_pre_hook(_in_own_dtype) for m in entries]
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast or contextlib.nullcontext():
            for m in modules:
                m.eval()
            for k, line in enumerate(prompts):
                generator = torch.Generator().manual_seed(seed + k)
                prompt, negative = split_negative(line)
                text = long_prompt_kwargs(pipe, prompt, max_token_length, clip_skip, negative)
                if text:
                    kwargs.pop("clip_skip", None)  # applied while encoding
                plain = {"prompt": prompt, **({"negative_prompt": negative} if negative else {})}
                image = pipe(
                    **(text or plain),
                    num_inference_steps=steps,
                    height=height,
                    width=width,
                    generator=generator,
                    output_type="np",
                    **kwargs,
                ).images[0]  # (H, W, 3) in [0, 1]
                images.append(to_uint8(image))
    finally:
        for hook in hooks:
            hook.remove()
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    labels = [split_negative(p)[0] for p in prompts]
    labels = [p if len(p) <= 40 else p[:37] + "..." for p in labels]
    return save_image(labelled_grid([[img] for img in images], labels, ["sample"], title=title), out)


def _in_own_dtype(module, args):
    dtype = next(module.parameters()).dtype
    return (args[0].to(dtype), *args[1:])


def long_prompt_kwargs(
    pipe, prompt: str, max_token_length: int | None, clip_skip: int | None, negative: str = ""
) -> dict | None:
    """Pipeline inputs (prompt_embeds, negative_prompt_embeds, pooled for SDXL) for a prompt as kohya's sampler
    encodes it (families/sample_text.py: up to 225 tokens in 75-token windows, (word:1.2) weights, A1111's BREAK);
    None when the pipeline's own 77-token encoding is the same (a plain prompt of at most 75 tokens, no clip skip).
    max_token_length does not matter here: kohya's sampler allows 225 tokens whatever the training used."""
    from lorafuse.families.sample_text import WINDOW, parse_weights, prompt_tokens, sample_embeddings

    del max_token_length
    if not family_of(pipe).long_prompts:
        return None
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    encoders = [t for t in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if t is not None]
    plain = all(w == 1.0 for text in (prompt, negative) for _, w in parse_weights(text))
    short = all(len(prompt_tokens(tokenizers[0], text)[0]) <= WINDOW for text in (prompt, negative))
    # with a clip skip ours too: diffusers' encode_prompt reaches text_model.final_layer_norm, which transformers 5
    # moved onto CLIPTextModel itself (AttributeError)
    if plain and short and not clip_skip:
        return None
    kohya_skip = 1 if clip_skip is None else clip_skip + 1  # diffusers' clip_skip -> kohya numbering
    cond = sample_embeddings(tokenizers, encoders, [prompt, negative], kohya_skip)
    dtype = next(family_of(pipe).denoiser(pipe).parameters()).dtype
    states = cond["encoder_hidden_states"].to(dtype)
    out = {"prompt_embeds": states[:1], "negative_prompt_embeds": states[1:]}
    if "pooled_prompt_embeds" in cond:
        pooled = cond["pooled_prompt_embeds"].to(dtype)
        out.update(pooled_prompt_embeds=pooled[:1], negative_pooled_prompt_embeds=pooled[1:])
    return out
