"""Every registered fusion method x tiny SD1.5 / SDXL / random world / FLUX.1 dev pipeline: with both weights 0 it equals the
base model exactly, `plan.close()` restores every weight bit for bit, and its options round-trip through TOML.
Parametrised over `method_names()`, so methods added later join automatically."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer

from lorafuse.config.toml_io import dump_config, load_config
from lorafuse.errors import UserInputError
from lorafuse.families import family_of
from lorafuse.fusion.registry import get_method, make_config, method_names
from lorafuse.fusion.sampling import sample
from lorafuse.fusion.synthetic import random_lora

PROMPT = "a photo of sks dog"
MARKED = "a photo of sks dog <c> in sks style <s>"  # what a method reading markers (CRAFT, SSR) plans with
OURS = ("direct", "klora", "switch", "composite", "ssr")  # these must run on every architecture with default options
_BASE: dict[str, np.ndarray] = {}


@pytest.fixture(params=["sd15", "sdxl", "world", "flux"])
def arch_pipe(request):
    return request.param, request.getfixturevalue(request.param)


def run(pipe, plan=None):
    kwargs = {} if plan is None else {"hooks": plan.hooks, "guidance": plan.guidance(6.0)}
    return sample(pipe, PROMPT, steps=3, seed=4, progress=False, **({"guidance": 6.0} | kwargs)).images


def base_images(arch, pipe):
    if arch not in _BASE:
        _BASE[arch] = run(pipe)
    return _BASE[arch]


def lora_pair(pipe):
    return random_lora(pipe, seed=1, rank=(2, 4), scale=0.3), random_lora(pipe, seed=2, rank=4, scale=0.25)


def snapshot(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for comp in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, comp, None)
        if module is not None:
            out.update({f"{comp}.{k}": v.clone() for k, v in module.state_dict().items()})
    return out


def plan_or_skip(name, pipe, content, style, **options):
    """Methods with requirements these generic inputs do not meet (references, an architecture) are skipped;
    the four built-in ones here must always plan."""
    method = get_method(name)
    try:
        _, config = method.prepare_prompt(MARKED, make_config(name, **options))  # as `lorafuse.fuse` does
        return method().plan(pipe, content, style, config)
    except UserInputError as e:
        if name in OURS:
            raise
        pytest.skip(f"{name} cannot run with generic inputs: {e}")


@pytest.mark.parametrize("name", method_names())
def test_zero_weights_equal_the_base(name, arch_pipe) -> None:
    arch, pipe = arch_pipe
    content, style = lora_pair(pipe)
    base = base_images(arch, pipe)
    plan = plan_or_skip(name, pipe, content, style)
    try:
        fused = run(pipe, plan)
    finally:
        plan.close()
    assert np.abs(fused - base).max() > 1e-2, f"{name} at weights 1 must change the image"
    plan = plan_or_skip(name, pipe, content, style, content_weight=0.0, style_weight=0.0)
    try:
        zero = run(pipe, plan)
    finally:
        plan.close()
    np.testing.assert_array_equal(zero, base)


@pytest.mark.parametrize("name", method_names())
def test_close_restores_the_base_exactly(name, arch_pipe) -> None:
    _, pipe = arch_pipe
    content, style = lora_pair(pipe)
    before = snapshot(pipe)
    plan = plan_or_skip(name, pipe, content, style, content_weight=0.9, style_weight=1.1)
    try:
        run(pipe, plan)
    finally:
        plan.close()
    plan.close()  # twice is safe
    after = snapshot(pipe)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not any(isinstance(m, LoraLayer) for m in family_of(pipe).denoiser(pipe).modules())


@pytest.mark.parametrize("name", method_names())
def test_options_round_trip_through_toml(name, tmp_path) -> None:
    cls = get_method(name).config_cls
    defaults = cls()
    path = tmp_path / f"{name}.toml"
    path.write_text(dump_config(defaults))
    assert load_config(cls, path) == defaults
    with pytest.raises(UserInputError, match="content_weight"):
        make_config(name, content_weight=100.0)
