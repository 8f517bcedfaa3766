"""`sample()` against the slow reference, diffusers' own pipelines, and the loop's contracts (seeds, hooks,
clip skip, input checks). Tiny random-weight pipelines; 2-3 steps each."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from lorafuse.errors import UserInputError
from lorafuse.fusion.prompts import encode_prompts, resolve_clip_skip
from lorafuse.fusion.sampling import sample
from lorafuse.fusion.schedulers import make_scheduler
from lorafuse.guidance import ClassifierFreeGuidance, FunctionHook

PROMPTS = ["a photo of sks dog", "a red car in the city"]
NEGATIVES = ["blurry", "low quality"]
# Same components, same ops, same order as diffusers: we expect bit-equal results and allow float rounding.
ATOL = 1e-6


def noise(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, size, size, generator=torch.Generator().manual_seed(seed))


def generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + k) for k in range(n)]


def test_seeds_change_the_images(pipe) -> None:
    # Every equality below would pass trivially if the output did not depend on the noise.
    a = sample(pipe, PROMPTS[0], steps=2, seed=0, progress=False).images
    b = sample(pipe, PROMPTS[0], steps=2, seed=1, progress=False).images
    assert np.abs(a - b).max() > 1e-2


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp", None])
def test_matches_diffusers_pipeline(pipe, diffusers_pipe, scheduler) -> None:
    latents = noise(4)
    ours = sample(
        pipe, PROMPTS, negative_prompt=NEGATIVES, num_images=2, steps=3, guidance=5.0, seed=3,
        scheduler=scheduler, latents=latents, progress=False,
    )  # fmt: skip
    ref = diffusers_pipe(pipe, scheduler)
    kwargs = dict(
        negative_prompt=NEGATIVES, num_images_per_prompt=2, num_inference_steps=3, guidance_scale=5.0,
        latents=latents, generator=generators(3, 4),
    )  # fmt: skip
    ref_latents = ref(PROMPTS, output_type="latent", **kwargs).images
    kwargs["generator"] = generators(3, 4)
    ref_images = ref(PROMPTS, output_type="np", **kwargs).images
    assert ours.images.shape == (4, 64, 64, 3)
    np.testing.assert_allclose(ours.latents.numpy(), ref_latents.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(ours.images, ref_images, rtol=0, atol=ATOL)


def test_seeded_noise_and_default_negatives_match_diffusers(pipe, diffusers_pipe) -> None:
    # No latents given: ours draws image k from seed + k, diffusers from a list of generators seeded the same.
    # negative_prompt=None: "" for SD1.5, all-zero embeddings for SDXL (force_zeros_for_empty_prompt).
    ours = sample(
        pipe, PROMPTS, num_images=2, steps=2, guidance=6.0, seed=7, scheduler="euler", progress=False
    )
    ref = diffusers_pipe(pipe, "euler")(
        PROMPTS, num_images_per_prompt=2, num_inference_steps=2, guidance_scale=6.0,
        generator=generators(7, 4), output_type="np",
    ).images  # fmt: skip
    np.testing.assert_allclose(ours.images, ref, rtol=0, atol=ATOL)


def test_scale_one_matches_diffusers_without_guidance(pipe, diffusers_pipe) -> None:
    latents = noise(1)
    ours = sample(pipe, PROMPTS[0], steps=2, guidance=1.0, latents=latents, progress=False).images
    ref = diffusers_pipe(pipe, "ddim")(
        PROMPTS[0], num_inference_steps=2, guidance_scale=1.0, latents=latents, output_type="np"
    ).images
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)
    guided = sample(pipe, PROMPTS[0], steps=2, guidance=7.5, latents=latents, progress=False).images
    assert np.abs(ours - guided).max() > 1e-3


def test_a_subset_of_a_batch_reproduces_alone(sd15) -> None:
    batch = sample(sd15, PROMPTS[0], num_images=3, steps=2, seed=10, progress=False)
    alone = sample(sd15, PROMPTS[0], num_images=1, steps=2, seed=12, progress=False)
    assert batch.settings["seeds"] == [10, 11, 12] and alone.settings["seeds"] == [12]
    # Same noise and prompt; only the batch size differs, which changes CPU rounding (~1e-5 here).
    np.testing.assert_allclose(batch.images[2], alone.images[0], rtol=0, atol=1e-3)
    assert np.abs(batch.images[0] - alone.images[0]).max() > 1e-2


def test_world_layout_pipeline_with_vae_factor_four(world, diffusers_pipe) -> None:
    ours = sample(world, "a", steps=2, guidance=3.0, seed=0, progress=False)
    ref = diffusers_pipe(world, "ddim")(
        "a", num_inference_steps=2, guidance_scale=3.0, generator=generators(0, 1), output_type="np"
    ).images
    assert ours.images.shape == (1, 64, 64, 3) and ours.latents.shape == (1, 4, 16, 16)
    np.testing.assert_allclose(ours.images, ref, rtol=0, atol=ATOL)
    with pytest.raises(UserInputError, match="multiple of 4"):
        sample(world, "a", height=62, progress=False)


def test_outputs_and_settings(sd15) -> None:
    pil = sample(sd15, PROMPTS, steps=1, output="pil", progress=False)
    assert len(pil.images) == 2 and all(isinstance(im, PIL.Image.Image) for im in pil.images)
    latent = sample(sd15, PROMPTS[0], steps=1, output="latent", progress=False)
    assert latent.images is latent.latents and latent.latents.shape == (1, 4, 8, 8)
    s = pil.settings
    assert s["scheduler"] == "DDIMScheduler" and s["prompt"] == PROMPTS and s["num_timesteps"] == 1
    assert s["clip_skip_diffusers"] == 0 and s["clip_skip_a1111"] == 1


def test_pipe_is_left_untouched(sd15) -> None:
    scheduler, config = sd15.scheduler, dict(sd15.scheduler.config)
    sample(sd15, PROMPTS[0], steps=2, scheduler="dpmpp", progress=False)
    assert sd15.scheduler is scheduler and dict(sd15.scheduler.config) == config


def test_make_scheduler() -> None:
    pipe = type("P", (), {})()
    from diffusers import PNDMScheduler

    pipe.scheduler = PNDMScheduler(steps_offset=1)
    assert make_scheduler(pipe, "ddim").config.clip_sample is False  # not set in the config: off for latents
    pipe.scheduler = PNDMScheduler.from_config({**pipe.scheduler.config, "clip_sample": True})
    assert make_scheduler(pipe, "ddim").config.clip_sample is True  # set explicitly: kept
    assert make_scheduler(pipe, "dpmpp").config.algorithm_type == "dpmsolver++"
    assert make_scheduler(pipe, None) is not pipe.scheduler


# --- hooks ---------------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple[int, int, torch.nn.Module]] = []
        self.finished = 0
        self.fail_at = fail_at

    def before_step(self, step_index: int, num_steps: int, unet: torch.nn.Module) -> None:
        if step_index == self.fail_at:
            raise RuntimeError("boom")
        self.calls.append((step_index, num_steps, unet))

    def after_sampling(self, unet: torch.nn.Module) -> None:
        self.finished += 1


@pytest.mark.parametrize(("scheduler", "num_steps"), [("ddim", 4), ("dpmpp", 4), (None, 5)])  # PNDM: T + 1
def test_hooks_see_every_step_index(sd15, scheduler, num_steps) -> None:
    hook = Recorder()
    sample(sd15, PROMPTS[0], steps=4, scheduler=scheduler, hooks=[hook], progress=False)
    assert [(i, n) for i, n, _ in hook.calls] == [(i, num_steps) for i in range(num_steps)]
    assert all(unet is sd15.unet for _, _, unet in hook.calls)
    assert hook.finished == 1


def test_after_sampling_runs_after_an_error(sd15) -> None:
    hook = Recorder(fail_at=1)
    with pytest.raises(RuntimeError, match="boom"):
        sample(sd15, PROMPTS[0], steps=3, hooks=[hook], progress=False)
    assert len(hook.calls) == 1 and hook.finished == 1


class OffsetAdapter:
    """A StepHook standing in for a per-step fusion (LoRA Switch, K-LoRA): from step `start` on, a fixed offset is
    added to conv_in's output (a forward hook, removed again in after_sampling)."""

    def __init__(self, start: int) -> None:
        self.start, self.handle = start, None
        self.delta = 0.5 * torch.randn(1, 32, 1, 1, generator=torch.Generator().manual_seed(5))

    def before_step(self, step_index: int, num_steps: int, unet: torch.nn.Module) -> None:
        if step_index == self.start:
            self.handle = unet.conv_in.register_forward_hook(lambda m, a, out: out + self.delta)

    def after_sampling(self, unet: torch.nn.Module) -> None:
        if self.handle is not None:
            self.handle.remove()


def test_a_hook_switches_the_unet_between_steps(sd15) -> None:
    def run(start: int) -> np.ndarray:
        return sample(sd15, PROMPTS[0], steps=4, seed=2, hooks=[OffsetAdapter(start)], progress=False).images

    base = sample(sd15, PROMPTS[0], steps=4, seed=2, progress=False).images
    always, never, halfway = run(0), run(99), run(2)
    assert np.abs(always - base).max() > 1e-3
    assert np.array_equal(never, base)
    assert np.abs(halfway - base).max() > 1e-4 and np.abs(halfway - always).max() > 1e-4
    # after_sampling removed the offset: the UNet is the base again
    assert np.array_equal(sample(sd15, PROMPTS[0], steps=4, seed=2, progress=False).images, base)


def test_function_hook(sd15) -> None:
    seen = []
    sample(sd15, "a", steps=2, hooks=[FunctionHook(lambda i, n, unet: seen.append((i, n)))], progress=False)
    assert seen == [(0, 2), (1, 2)]


# --- clip skip -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "convention", "skipped"),
    [(None, "diffusers", 0), (0, "diffusers", 0), (1, "diffusers", 1), (1, "a1111", 0), (2, "a1111", 1)],
)
def test_clip_skip_conventions(value, convention, skipped) -> None:
    assert resolve_clip_skip(value, convention) == skipped


@pytest.mark.parametrize(
    ("value", "convention", "match"),
    [
        (0, "a1111", "start at 1"),
        (-1, "diffusers", ">= 0"),
        (1, "kohya", "clip_skip_convention"),
        (1.0, "a1111", "int"),
    ],
)
def test_bad_clip_skip(value, convention, match) -> None:
    with pytest.raises(UserInputError, match=match):
        resolve_clip_skip(value, convention)


def _sd15_reference_embeds(pipe, text: str, skip: int) -> torch.Tensor:
    """diffusers' SD1.5 formula (encode_prompt): hidden_states[-(clip_skip + 1)], then the final LayerNorm."""
    ids = pipe.tokenizer(
        text, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(skip + 1)]
        return pipe.text_encoder.final_layer_norm(hidden)


def _encode(pipe, skip: int):
    with torch.no_grad():
        return encode_prompts(
            pipe, [PROMPTS[0]], [NEGATIVES[0]], num_images=1, clip_skip=skip, height=64, width=64
        )


@pytest.mark.xfail(raises=AttributeError, strict=True, reason="diffusers#14124: SD1.5 clip_skip reads "
                   "text_encoder.text_model, which transformers 5 removed; when this passes, compare to it directly")  # fmt: skip
def test_diffusers_sd15_clip_skip_still_fails_on_transformers_5(sd15) -> None:
    sd15.encode_prompt(PROMPTS[0], "cpu", 1, True, clip_skip=1)


def test_sd15_clip_skip_matches_diffusers_formula(sd15, diffusers_pipe) -> None:
    skipped, plain = _encode(sd15, 1), _encode(sd15, 0)
    ref = _sd15_reference_embeds(sd15, PROMPTS[0], 1)
    assert (ref - plain.cond.embeds).abs().max() > 1e-3
    torch.testing.assert_close(skipped.cond.embeds, ref, rtol=0, atol=0)
    # The negative prompt uses the same layer (A1111 / kohya behaviour; diffusers uses the last layer there).
    torch.testing.assert_close(
        skipped.uncond.embeds, _sd15_reference_embeds(sd15, NEGATIVES[0], 1), rtol=0, atol=0
    )
    # Whole run: ours with A1111's "clip skip 2" == diffusers given those embeddings.
    latents = noise(1)
    ours = sample(
        sd15, PROMPTS[0], negative_prompt=NEGATIVES[0], steps=2, latents=latents,
        clip_skip=2, clip_skip_convention="a1111", progress=False,
    ).images  # fmt: skip
    ref_images = diffusers_pipe(sd15, "ddim")(
        prompt_embeds=skipped.cond.embeds, negative_prompt_embeds=skipped.uncond.embeds,
        num_inference_steps=2, latents=latents, output_type="np",
    ).images  # fmt: skip
    np.testing.assert_allclose(ours, ref_images, rtol=0, atol=ATOL)


def test_sdxl_clip_skip_matches_diffusers(deep_sdxl, diffusers_pipe) -> None:
    latents = noise(1)
    ref = diffusers_pipe(deep_sdxl, "euler")

    def ours(**kwargs) -> np.ndarray:
        return sample(
            deep_sdxl, PROMPTS[0], steps=2, guidance=5.0, scheduler="euler", latents=latents,
            progress=False, **kwargs,
        ).images  # fmt: skip

    def theirs(**kwargs) -> np.ndarray:
        return ref(
            PROMPTS[0], num_inference_steps=2, guidance_scale=5.0, latents=latents, output_type="np", **kwargs
        ).images

    plain, skipped = theirs(), theirs(clip_skip=1)
    assert np.abs(plain - skipped).max() > 1e-3
    # negative_prompt=None gives all-zero negatives in both, so diffusers' positive-only clip skip is comparable.
    np.testing.assert_allclose(ours(clip_skip=1), skipped, rtol=0, atol=ATOL)
    np.testing.assert_allclose(ours(clip_skip=2, clip_skip_convention="a1111"), skipped, rtol=0, atol=ATOL)
    np.testing.assert_allclose(ours(), plain, rtol=0, atol=ATOL)


def test_clip_skip_beyond_the_encoder_is_refused(sd15, sdxl) -> None:
    with pytest.raises(UserInputError, match="largest usable value is 1"):
        sample(sd15, "a", clip_skip=2, progress=False)  # 2-layer encoder
    # SDXL already starts from the penultimate layer: with 2 layers nothing is left to skip.
    with pytest.raises(UserInputError, match="largest usable value is 1"):
        sample(sdxl, "a", clip_skip=2, clip_skip_convention="a1111", progress=False)


# --- input checks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt": 3}, "prompt must be a string"),
        ({"prompt": []}, "non-empty list"),
        ({"negative_prompt": ["x", "y"]}, "2 negative prompts for 1 prompts"),
        ({"negative_prompt": 5}, "negative_prompt must be"),
        ({"steps": 0}, "steps must be an int >= 1"),
        ({"num_images": 1.5}, "num_images must be an int"),
        ({"guidance": -1.0}, "guidance scale must be finite and >= 0"),
        ({"guidance": "high"}, "guidance scale must be a number"),
        ({"scheduler": "heun"}, "unknown scheduler 'heun'; expected one of ddim, euler, dpmpp"),
        ({"height": 60}, "height must be a positive multiple of 8"),
        ({"width": 0}, "width must be a positive multiple of 8"),
        ({"latents": torch.zeros(2, 4, 8, 8)}, r"latents must have shape \(1, 4, 8, 8\)"),
        ({"hooks": [lambda i, n, u: None]}, "is not a StepHook"),
        ({"output": "png"}, "unknown output 'png'"),
    ],
)
def test_bad_inputs_give_clear_errors(sd15, kwargs, match) -> None:
    args = {"prompt": "a photo", **kwargs}
    with pytest.raises(UserInputError, match=match):
        sample(sd15, args.pop("prompt"), progress=False, **args)


def test_guidance_object_is_used_as_given(sd15) -> None:
    latents = noise(1)
    a = sample(sd15, "a", steps=2, guidance=ClassifierFreeGuidance(3.0), latents=latents, progress=False)
    b = sample(sd15, "a", steps=2, guidance=3.0, latents=latents, progress=False)
    assert np.array_equal(a.images, b.images)
    assert "scale=3.0" in a.settings["guidance"]


def test_progress_bar_is_shown_on_request(sd15, capsys) -> None:
    sample(sd15, "a", steps=2, progress=True)
    assert "sampling" in capsys.readouterr().err
    sample(sd15, "a", steps=2, progress=False)
    assert "sampling" not in capsys.readouterr().err
