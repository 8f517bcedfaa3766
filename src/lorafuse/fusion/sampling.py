"""The one sampling loop every fusion method and guidance policy plugs into.

`sample` is laid out like diffusers' `StableDiffusionPipeline.__call__`, and with CFG it gives the same images
as diffusers' SD, SDXL and FLUX.1 pipelines (tests/fusion/test_sampling*.py compare them). What differs between
bases (prompt encoding, latent layout, timesteps, the denoiser call) is asked of the base's family
(`lorafuse.families`), never branched on here. Per-step methods change two lines of the loop (# 7), never more:
- `hook.before_step(i, T, denoiser)`: weight-level changes between steps (K-LoRA's per-layer choice, LoRA Switch);
- `guidance(model_fn, x, t, i, T, cond)`: how a step's prediction is formed (CFG, asymmetric CFG with
  per-sample adapters, LoRA Composite); see `lorafuse.guidance`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from torch import Tensor
from tqdm.auto import tqdm

from lorafuse.errors import UserInputError
from lorafuse.families import family_of
from lorafuse.fusion.prompts import encode_prompts, max_clip_skip, resolve_clip_skip
from lorafuse.fusion.schedulers import make_scheduler
from lorafuse.guidance.base import Guidance, StepHook
from lorafuse.guidance.cfg import ClassifierFreeGuidance

OUTPUTS = ("np", "pil", "latent")


@dataclass(frozen=True)
class SampleResult:
    """images: (N, H, W, 3) floats in [0, 1] for "np", N PIL images for "pil", the latents for "latent".
    latents: (N, C, h, w) final latents, still multiplied by the VAE scaling factor.
    settings: JSON-ready record of every choice that decides the images (seeds, scheduler, clip skip ...)."""

    images: Any
    latents: Tensor
    settings: dict[str, Any]


DEFAULT = "default"  # scheduler / guidance: the base family's default


@torch.no_grad()
def sample(
    pipe: DiffusionPipeline,
    prompt: str | Sequence[str],
    *,
    negative_prompt: str | Sequence[str] | None = None,
    num_images: int = 1,
    steps: int = 25,
    guidance: Guidance | float | None = None,
    seed: int = 0,
    scheduler: str | None = DEFAULT,
    height: int | None = None,
    width: int | None = None,
    clip_skip: int | None = None,
    clip_skip_convention: str = "diffusers",
    embedded_guidance: float | None = None,
    latents: Tensor | None = None,
    hooks: Sequence[StepHook] = (),
    output: str = "np",
    progress: bool = True,
) -> SampleResult:
    """Text-to-image with a diffusers pipeline of any registered family (SD1.5, SDXL, the world model, FLUX.1).

    prompt: one prompt or a list; each gets `num_images` images, so N = len(prompts) * num_images.
    guidance: a `Guidance` policy, or a number g for `ClassifierFreeGuidance(g)`; None is the family's default
        (7.5 for SD; 1.0 for FLUX.1, i.e. no true CFG: its dev model is guidance-distilled).
    seed: image k of the N (prompt-major order) starts from noise drawn by a CPU generator seeded `seed + k`,
        so any one image reproduces alone with `seed + k` and `num_images=1`, on any device.
    scheduler: "ddim", "euler", "dpmpp" (DPM-Solver++ multistep) for SD, built from the pipeline's scheduler
        config; None uses a fresh copy of the pipeline's own; "default" is the family's default. `pipe` is
        never modified.
    clip_skip: in diffusers numbering (None or 0 = last layer, 1 = penultimate). kohya/A1111 number it one
        higher (their 2 is our 1): pass `clip_skip_convention="a1111"` to give their number. Applied to the
        negative prompt too (diffusers does not); see `lorafuse.fusion.prompts`.
    embedded_guidance: the guidance scale a guidance-distilled model (FLUX.1 dev) embeds; None is its default.
    latents: optional initial noise (N, C, h, w), standard normal, in the VAE's layout; replaces the seeded draw.
    hooks: `StepHook`s; `before_step(i, T, denoiser)` runs before each step, `after_sampling(denoiser)` at the end.
    """
    # 0. Default height and width: the denoiser's native sample size
    family = family_of(pipe)
    height = family.sample_size(pipe) if height is None else height
    width = family.sample_size(pipe) if width is None else width
    scheduler = family.default_scheduler if scheduler == DEFAULT else scheduler
    guidance = family.default_guidance if guidance is None else guidance

    # 1. Check inputs, before any compute
    check_counts(num_images, steps, seed)
    check_inputs(
        pipe, prompt, negative_prompt, num_images, steps, guidance, scheduler, height, width,
        clip_skip, clip_skip_convention, latents, hooks, output, embedded_guidance,
    )  # fmt: skip

    # 2. Define call parameters
    prompts = _as_list(prompt, 1)
    negatives = None if negative_prompt is None else _as_list(negative_prompt, len(prompts))
    guidance = guidance if callable(guidance) else ClassifierFreeGuidance(float(guidance))
    skip = resolve_clip_skip(clip_skip, clip_skip_convention)
    denoiser = family.denoiser(pipe)
    batch = len(prompts) * num_images
    seeds = [seed + k for k in range(batch)]
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    # 3. Encode input prompt: B rows of prompt and of negative-prompt conditioning
    cond = encode_prompts(
        pipe, prompts, negatives, num_images=num_images, clip_skip=skip,
        height=height, width=width,
    )  # fmt: skip

    # 4. Prepare latent variables: (B, C, h, w), one draw per image so a subset reproduces; then the
    # denoiser's layout (FLUX packs 2x2 patches into tokens)
    factor = pipe.vae_scale_factor
    if latents is None:
        shape = (1, family.latent_channels(pipe), height // factor, width // factor)
        latents = torch.cat([torch.randn(shape, generator=g, dtype=denoiser.dtype) for g in generators])
    latents = family.pack_latents(latents.to(denoiser.device, denoiser.dtype))

    # 5. Prepare timesteps (FLUX shifts them by the image's token count)
    sched = make_scheduler(pipe, scheduler)
    family.set_timesteps(sched, steps, denoiser.device, latents)
    timesteps = sched.timesteps
    num_steps = len(timesteps)  # = steps for DDIM, Euler, DPM++, flow-match Euler; PNDM adds one
    latents = family.scale_initial_noise(sched, latents)

    # 6. Prepare extra step kwargs: stochastic steps (Euler with churn, SDE solvers) draw from the same generators
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(sched.step).parameters else {}

    # 7. Denoising loop
    model_fn = family.model_fn(denoiser, height=height, width=width, embedded_guidance=embedded_guidance)
    try:
        for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress)):
            for hook in hooks:
                hook.before_step(i, num_steps, denoiser)
            model_input = family.model_input(sched, latents, t)
            noise_pred = guidance(model_fn, model_input, t, i, num_steps, cond)  # (B, ...) as latents
            latents = sched.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
    finally:
        for hook in reversed(hooks):  # undo in reverse order, like nested contexts
            hook.after_sampling(denoiser)

    # 8. Decode
    latents = family.unpack_latents(latents, height, width, pipe)
    settings = _settings(family.name, prompts, negatives, num_images, steps, num_steps, guidance, model_fn, seeds,
                         sched, height, width, skip, hooks, output)  # fmt: skip
    settings.update(dtype=str(denoiser.dtype).removeprefix("torch."), device=str(denoiser.device))
    return SampleResult(decode_latents(pipe, latents, output), latents, settings)


def _settings(arch: str, prompts: list[str], negatives: list[str] | None, num_images: int, steps: int,
              num_steps: int, guidance: Guidance, model_fn: Any, seeds: list[int], sched: Any, height: int,
              width: int, skip: int, hooks: Sequence[StepHook], output: str) -> dict[str, Any]:  # fmt: skip
    """What `sample` ran with, JSON-ready, for the result's record."""
    return {
        "arch": arch,
        "prompt": prompts,
        "negative_prompt": negatives,
        "num_images": num_images,
        "steps": steps,
        "num_timesteps": num_steps,
        "guidance": repr(guidance),
        "embedded_guidance": getattr(model_fn, "embedded_guidance", None),
        "seed": seeds[0],
        "seeds": seeds,
        "scheduler": type(sched).__name__,
        "height": height,
        "width": width,
        "clip_skip_diffusers": skip,
        "clip_skip_a1111": skip + 1,
        "hooks": [repr(h) for h in hooks],
        "output": output,
    }


def decode_latents(pipe: DiffusionPipeline, latents: Tensor, output: str = "np") -> Any:
    """VAE-decode (N, C, h, w) latents to "np" / "pil" images, as diffusers' pipelines do; "latent" returns them."""
    if output == "latent":
        return latents
    vae, config = pipe.vae, pipe.vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    shift = getattr(config, "shift_factor", None)  # FLUX's VAE centres its latents
    if shift is not None:
        z = latents / config.scaling_factor + shift
    elif mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        z = latents * std / config.scaling_factor + mean
    else:
        z = latents / config.scaling_factor
    # fp16 VAEs that ask for it (SDXL's) overflow while decoding: decode those in float32.
    upcast = vae.dtype == torch.float16 and getattr(config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        image = vae.decode(z.to(vae.device, vae.dtype), return_dict=False)[0]  # (N, 3, H, W) in [-1, 1]
    finally:
        if upcast:
            vae.to(torch.float16)
    return pipe.image_processor.postprocess(image, output_type=output)


def _as_list(text: str | Sequence[str], n: int) -> list[str]:
    return [text] * n if isinstance(text, str) else list(text)


SEED_RANGE = (-(2**63), 2**63 - 1)  # what torch.Generator.manual_seed takes without overflowing


def check_counts(num_images: Any, steps: Any, seed: Any = 0) -> None:
    """The numbers of a sampling call that need no base: run before a base loads."""
    for name, value in (("num_images", num_images), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserInputError(f"seed must be an int, got {seed!r}")
    low, high = SEED_RANGE
    if not (low <= seed and seed + num_images - 1 <= high):
        raise UserInputError(f"seed {seed}: seeds (seed + image index) must lie in [{low}, {high}]")


def check_inputs(
    pipe: DiffusionPipeline,
    prompt: Any,
    negative_prompt: Any,
    num_images: Any,
    steps: Any,
    guidance: Any,
    scheduler: Any,
    height: Any,
    width: Any,
    clip_skip: Any,
    clip_skip_convention: str,
    latents: Tensor | None,
    hooks: Sequence[Any],
    output: str,
    embedded_guidance: float | None = None,
) -> None:
    """Raise `UserInputError` naming the argument, what was expected and what was given."""
    if isinstance(prompt, str):
        n_prompts = 1
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
        n_prompts = len(prompt)
    else:
        raise UserInputError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        if not (isinstance(negative_prompt, Sequence) and all(isinstance(p, str) for p in negative_prompt)):
            raise UserInputError(
                f"negative_prompt must be None, a string or a list of strings, got {negative_prompt!r}"
            )
        if len(negative_prompt) != n_prompts:
            raise UserInputError(
                f"{len(negative_prompt)} negative prompts for {n_prompts} prompts; give one per prompt or a single string"
            )
    check_counts(num_images, steps)
    trained = getattr(getattr(pipe, "scheduler", None), "config", {}).get("num_train_timesteps")
    if isinstance(trained, int) and steps > trained:  # diffusers' set_timesteps would raise deep in sampling
        raise UserInputError(f"steps must be at most {trained}, the timesteps this base was trained with; got {steps}")
    if not callable(guidance):
        ClassifierFreeGuidance(guidance)  # validates the number: finite and >= 0
    family = family_of(pipe)
    family.check_scheduler(scheduler)
    family.check_pipeline(pipe, embedded_guidance)
    factor = family.size_multiple(pipe)
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % factor:
            raise UserInputError(
                f"{name} must be a positive multiple of {factor} (what this base's VAE and denoiser need), got {value!r}"
            )
    skip = resolve_clip_skip(clip_skip, clip_skip_convention)
    if skip > max_clip_skip(pipe):
        raise UserInputError(
            f"clip_skip={clip_skip} ({clip_skip_convention} numbering) skips every layer of this text encoder; "
            f"the largest usable value is {max_clip_skip(pipe) + (clip_skip_convention == 'a1111')}"
        )
    if latents is not None:
        f = pipe.vae_scale_factor
        expected = (n_prompts * num_images, family.latent_channels(pipe), height // f, width // f)
        if tuple(latents.shape) != expected:
            raise UserInputError(
                f"latents must have shape {expected} (N, C, h, w), got {tuple(latents.shape)}"
            )
    for hook in hooks:
        if not isinstance(hook, StepHook):
            raise UserInputError(
                f"hook {hook!r} is not a StepHook: it needs before_step(step_index, num_steps, unet) and "
                "after_sampling(unet); wrap a plain function in lorafuse.guidance.FunctionHook"
            )
    if output not in OUTPUTS:
        raise UserInputError(f"unknown output {output!r}; expected one of {', '.join(OUTPUTS)}")
