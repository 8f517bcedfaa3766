"""Shared pieces for the sampling tests: tiny pipelines and the same pipelines run by diffusers itself."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from lorafuse.models.tiny import text_encoder_configs, tiny_sd15_pipeline, tiny_sdxl_pipeline
from lorafuse.models.world import fresh_components, world_tokenizer

# Tests run with --import-mode=importlib, so test modules cannot import this file: helpers are fixtures.


@pytest.fixture(scope="session")
def sd15() -> StableDiffusionPipeline:
    return tiny_sd15_pipeline(0)


@pytest.fixture(scope="session")
def sdxl() -> StableDiffusionXLPipeline:
    return tiny_sdxl_pipeline(0)


@pytest.fixture(scope="session", params=["sd15", "sdxl"])
def pipe(request: pytest.FixtureRequest) -> DiffusionPipeline:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def flux() -> DiffusionPipeline:
    from lorafuse.models.tiny_flux import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def deep_sdxl() -> StableDiffusionXLPipeline:
    """Tiny SDXL with 3-layer text encoders: SDXL reads the penultimate layer, so clip skip 1 needs 3 layers."""
    pipe = tiny_sdxl_pipeline(0)
    configs = text_encoder_configs("sdxl", [pipe.tokenizer, pipe.tokenizer_2])
    for config in configs:
        config.num_hidden_layers = 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.text_encoder = CLIPTextModel(configs[0]).eval()
        pipe.text_encoder_2 = CLIPTextModelWithProjection(configs[1]).eval()
    return pipe


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusionPipeline:
    """A random-weight built-in world model: SD1.5 layout with a VAE factor of 4, not 8."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        components = fresh_components(world_tokenizer(tmp_path_factory.mktemp("world-tok")))
    for name in ("unet", "vae", "text_encoder"):
        components[name].eval()
    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


@pytest.fixture(scope="session")
def diffusers_pipe() -> Callable[[DiffusionPipeline, str | None], DiffusionPipeline]:
    """The reference: the same components in diffusers' own pipeline class, with the scheduler built the way
    diffusers' docs do it (`XScheduler.from_config(pipe.scheduler.config)`)."""
    classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp": DPMSolverMultistepScheduler}

    def build(pipe: DiffusionPipeline, scheduler: str | None) -> DiffusionPipeline:
        config = pipe.scheduler.config
        extra = {}
        if scheduler == "dpmpp":
            extra["algorithm_type"] = "dpmsolver++"
        if scheduler == "ddim" and "clip_sample" not in config:
            # The tiny configs omit clip_sample; the released SD1.5 and SDXL configs set it to False.
            extra["clip_sample"] = False
        cls = classes[scheduler] if scheduler else type(pipe.scheduler)
        components = {**pipe.components, "scheduler": cls.from_config(config, **extra)}
        if isinstance(pipe, StableDiffusionXLPipeline):
            ref = StableDiffusionXLPipeline(
                **components, force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt,
                add_watermarker=False,
            )  # fmt: skip
        else:
            ref = StableDiffusionPipeline(**components, requires_safety_checker=False)
        ref.set_progress_bar_config(disable=True)
        return ref

    return build
