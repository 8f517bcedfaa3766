"""Every fusion method and the sampling loop in bf16 (a base loaded with dtype="bf16"), against the same run in
fp32, on the random world (SD architecture) and tiny FLUX.1 bases.

Tolerance: bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2 % per operation). Over 3 sampling steps
of these tiny models the images (values in [0, 1]) measured a mean |bf16 − fp32| of ~0.003 and a max of ~0.03 on
the world base. We allow a mean of 0.02 and a max of 0.15, and require the LoRAs' own effect (fused − base, in
bf16) to stay well above the bf16 error, so a method that silently drops its LoRAs in bf16 fails. The base comes
back bit for bit in bf16 after every method, as in fp32.

ZipLoRA's learned mergers are compared through the fusion, not the learning: Adam's first steps move each merger
element by about lr · sign(gradient), so bf16 rounding that flips the sign of a near-zero gradient element
legitimately changes the mergers. Both runs use the mergers learned once in fp32; learning in bf16 is checked to
run and to keep the LoRAs' effect.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafuse.errors import UserInputError
from lorafuse.families import family_of
from lorafuse.fusion.api import fuse, load_base
from lorafuse.fusion.registry import method_names
from lorafuse.fusion.synthetic import random_lora
from lorafuse.models.load import load_base_pipeline
from lorafuse.world.render import render_named

PROMPT = "a photo of a sks teapot <c>, in sks style <s>"
# SSR-Merge solves its router from activations recorded while sampling; in bf16 those carry bf16 rounding, which
# the least-squares solve passes on to the fused weights (measured on world-random: mean 0.016, max 0.19)
MAX_ERROR = {"ssr": 0.3}
BASES = ("world-random", "flux-tiny")
_PIPES: dict[tuple[str, str], object] = {}


def pipe_of(base: str, dtype: str):
    if (base, dtype) not in _PIPES:
        _PIPES[base, dtype] = load_base_pipeline(base, dtype=dtype)
    return _PIPES[base, dtype]


def references() -> dict:
    """ZipLoRA learns its mergers from one reference image per LoRA (2 steps here)."""
    return dict(content_image=render_named("teapot_8", "flat"), content_prompt="a photo of a teapot",
                style_image=render_named("car_2", "watercolor"), style_prompt="a car in watercolor style",
                max_steps=2)  # fmt: skip


def run(base: str, dtype: str, method: str, **options) -> np.ndarray:
    pipe = pipe_of(base, dtype)
    content = random_lora(pipe_of(base, "fp32"), seed=1, scale=0.3)  # the same fp32 LoRA files for both runs
    style = random_lora(pipe_of(base, "fp32"), seed=2, scale=0.3)
    result = fuse(content, style, method=method, prompt=PROMPT, base=pipe, steps=3, seed=5, progress=False,
                  **options)  # fmt: skip
    assert result.record["sampling"]["dtype"] == ("bfloat16" if dtype == "bf16" else "float32")
    return result.images


def weights_of(pipe) -> dict[str, torch.Tensor]:
    denoiser = family_of(pipe).denoiser(pipe)
    return {k: v.clone() for k, v in denoiser.state_dict().items()}


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("method", method_names())
def test_bf16_fusion_matches_fp32(base, method, tmp_path) -> None:
    pipe = pipe_of(base, "bf16")
    before = weights_of(pipe)
    options = {}
    if method == "ziplora":
        learned = run(base, "bf16", method, **references())
        assert np.isfinite(learned).all()
        run(base, "fp32", method, **references(), save_mergers=tmp_path / "m.safetensors")
        options = {"mergers": tmp_path / "m.safetensors"}
    try:
        low = run(base, "bf16", method, **options)
    except UserInputError as e:
        if "not available on" in str(e):
            pytest.skip(f"{method} does not run on {base}: {e}")
        raise
    full = run(base, "fp32", method, **options)
    zero = run(base, "bf16", method, **options, content_weight=0.0, style_weight=0.0)
    error = np.abs(low.astype(np.float64) - full)
    assert error.mean() < 0.02 and error.max() < MAX_ERROR.get(method, 0.15), (error.mean(), error.max())
    effect = np.abs(low.astype(np.float64) - zero).mean()
    assert effect > 3 * error.mean(), f"the LoRAs' effect in bf16 ({effect:.4f}) is lost in the bf16 error"
    after = weights_of(pipe)
    assert all(v.dtype == torch.bfloat16 for v in after.values() if v.is_floating_point())
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_device_and_dtype_are_checked_before_loading() -> None:
    with pytest.raises(UserInputError, match="dtype 'int8': choose one of fp32, fp16, bf16"):
        load_base_pipeline("world-random", dtype="int8")
    with pytest.raises(UserInputError, match="device 'gpu0': not a device name"):
        load_base_pipeline("world-random", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="device 'cuda': no CUDA device is visible here"):
            load_base_pipeline("world-random", device="cuda")
    with pytest.raises(UserInputError, match="device and dtype apply to a base given by name"):
        load_base(pipe_of("world-random", "fp32"), dtype="bf16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
@pytest.mark.parametrize("method", ["direct", "klora", "craft"])
def test_cuda_fusion_matches_cpu(method) -> None:
    cuda = load_base_pipeline("world-random", device="cuda")
    content = random_lora(pipe_of("world-random", "fp32"), seed=1, scale=0.3)
    style = random_lora(pipe_of("world-random", "fp32"), seed=2, scale=0.3)
    on_gpu = fuse(content, style, method=method, prompt=PROMPT, base=cuda, steps=3, seed=5, progress=False)
    on_cpu = fuse(content, style, method=method, prompt=PROMPT, base=pipe_of("world-random", "fp32"), steps=3,
                  seed=5, progress=False)  # fmt: skip
    assert on_gpu.record["sampling"]["device"].startswith("cuda")
    np.testing.assert_allclose(on_gpu.images, on_cpu.images, atol=2e-2)
