"""`sample()` on FLUX.1 against diffusers' own `FluxPipeline.__call__` on flux-tiny: flow-match Euler with the
resolution-dependent shift, the guidance embedding (dev), schnell, and true CFG with a negative prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from lorafuse.errors import UserInputError
from lorafuse.fusion.sampling import sample
from lorafuse.models.tiny_flux import tiny_flux_pipeline

PROMPTS = ["a photo of sks dog", "a red car in the city"]
NEGATIVES = ["blurry", "low quality"]
# Same ops in the same order: bit-equal without CFG; true CFG runs both branches in one batch where diffusers
# runs two forwards, which changes float rounding only.
ATOL = 1e-6
ATOL_CFG = 1e-5


@pytest.fixture(scope="module")
def dev() -> FluxPipeline:
    pipe = tiny_flux_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def schnell() -> FluxPipeline:
    pipe = tiny_flux_pipeline(0, schnell=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + k) for k in range(n)]


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_matches_flux_pipeline(request, variant: str, size: tuple[int, int]) -> None:
    pipe = request.getfixturevalue(variant)
    h, w = size
    ours = sample(pipe, PROMPTS, num_images=2, steps=3, seed=5, height=h, width=w, progress=False, output="np")
    ref = pipe(PROMPTS, num_images_per_prompt=2, num_inference_steps=3, height=h, width=w,
               generator=generators(5, 4), output_type="np").images  # fmt: skip
    assert ours.images.shape == (4, h, w, 3)
    np.testing.assert_allclose(ours.images, ref, rtol=0, atol=ATOL)
    assert ours.settings["embedded_guidance"] == (3.5 if variant == "dev" else None)


def test_embedded_guidance_and_seeds_change_the_images(dev) -> None:
    a = sample(dev, PROMPTS[0], steps=2, seed=0, progress=False).images
    b = sample(dev, PROMPTS[0], steps=2, seed=1, progress=False).images
    c = sample(dev, PROMPTS[0], steps=2, seed=0, embedded_guidance=8.0, progress=False).images
    assert np.abs(a - b).max() > 1e-3 and np.abs(a - c).max() > 1e-4


def test_true_cfg_with_negative_prompt_matches(dev) -> None:
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = sample(dev, PROMPTS, negative_prompt=NEGATIVES, guidance=4.0, embedded_guidance=2.0, steps=3,
                  latents=latents, progress=False)  # fmt: skip
    packed = FluxPipeline._pack_latents(latents, 2, 16, 8, 8)
    ref = dev(PROMPTS, negative_prompt=NEGATIVES, true_cfg_scale=4.0, guidance_scale=2.0, num_inference_steps=3,
              latents=packed, height=64, width=64, output_type="latent").images  # fmt: skip
    ref = FluxPipeline._unpack_latents(ref, 64, 64, dev.vae_scale_factor)
    np.testing.assert_allclose(ours.latents.numpy(), ref.numpy(), rtol=0, atol=ATOL_CFG)
    plain = sample(dev, PROMPTS, steps=3, embedded_guidance=2.0, latents=latents, progress=False)
    assert (ours.latents - plain.latents).abs().max() > 1e-3


def test_flux_input_errors(dev, schnell) -> None:
    with pytest.raises(UserInputError, match="multiple of 16"):
        sample(dev, "a dog", height=56, steps=1, progress=False)
    with pytest.raises(UserInputError, match="does not run FLUX.1"):
        sample(dev, "a dog", scheduler="ddim", steps=1, progress=False)
    with pytest.raises(UserInputError, match="no guidance embedding"):
        sample(schnell, "a dog", embedded_guidance=3.0, steps=1, progress=False)
