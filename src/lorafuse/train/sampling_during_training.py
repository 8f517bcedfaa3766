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

from lorafuse.utils.images import labelled_grid, save_image, to_uint8

GUIDANCE_SCALE = 7.0  # the character-style-transfer paper's sampling setting (Chu)


def sample_grid(
    pipe,
    prompts: Sequence[str],
    out: Path,
    *,
    steps: int,
    seed: int,
    resolution: int,
    clip_skip: int | None = None,
    title: str = "",
    autocast: contextlib.AbstractContextManager | None = None,
) -> Path:
    """Render each prompt once (seed + prompt index) and save a labelled grid (one row per prompt) at `out`."""
    modules = [
        m
        for m in (pipe.unet, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
        if m
    ]
    modes = [m.training for m in modules]
    kwargs = {"clip_skip": clip_skip} if clip_skip else {}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    images = []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast or contextlib.nullcontext():
            for m in modules:
                m.eval()
            for k, prompt in enumerate(prompts):
                generator = torch.Generator().manual_seed(seed + k)
                image = pipe(
                    prompt,
                    num_inference_steps=steps,
                    guidance_scale=GUIDANCE_SCALE,
                    height=resolution,
                    width=resolution,
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
