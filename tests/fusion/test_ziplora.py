"""ZipLoRA: unit mergers are exactly the direct merge, a few Adam steps lower the objective, the refactored LoRA's
ΔW is ΔW_c diag(m_c) + ΔW_s diag(m_s), files hold low-rank factors and merger vectors only; tiny SD1.5, SDXL and
the random-weight world model. References are world renders encoded with each pipe's own VAE."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from lorafuse.errors import UserInputError
from lorafuse.fusion.registry import get_method, make_config
from lorafuse.fusion.sampling import sample
from lorafuse.fusion.ziplora import (
    ZipMergers,
    encode_reference,
    train_ziplora,
    ziplora_lora,
    ziplora_loss,
)
from lorafuse.lora.io import save_lora
from lorafuse.lora.merge import fuse_into, merge_loras, unfuse
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import base_modules
from lorafuse.world.render import render_named

PROMPT = "a red car in watercolor style"


@pytest.fixture(params=["sd15", "sdxl", "world"])
def base(request: pytest.FixtureRequest):
    return request.getfixturevalue(request.param)


def make_lora(pipe, seed: int, text_encoder: bool = False, scale: float = 0.2) -> LoraState:
    """Random LoRA on every UNet Linear / Conv2d (LoCon on 3x3 convs), optionally the text encoders too."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i, (key, ref) in enumerate(sorted(base_modules(pipe).modules.items())):
        if not (key.startswith("unet.") or text_encoder):
            continue
        out_f, in_f, *kernel = ref.shape
        r = 2 + i % 2
        down = torch.randn((r, in_f, *kernel), generator=g) * scale
        up = torch.randn((out_f, r, *([1, 1] if kernel else [])), generator=g) * scale
        modules[key] = LoraModule(down=down, up=up, alpha=None if i % 2 else 1.0)
    return LoraState(modules=modules)


def references(pipe):
    return (
        encode_reference(pipe, render_named("teapot_8", "flat", seed=0), "a photo of a teapot"),
        encode_reference(pipe, render_named("car_2", "watercolor", seed=1), "a car in watercolor style"),
    )


def random_mergers(content: LoraState, style: LoraState, seed: int) -> ZipMergers:
    g = torch.Generator().manual_seed(seed)

    def draw(state):
        return {
            k: torch.rand(m.down.shape[1], generator=g) * 2
            for k, m in state.modules.items()
            if k.startswith("unet.")
        }

    return ZipMergers(draw(content), draw(style))


def render(pipe) -> torch.Tensor:
    return sample(pipe, PROMPT, steps=2, seed=0, output="latent", progress=False).latents


def plan_for(pipe, content, style, **options):
    return get_method("ziplora")().plan(pipe, content, style, make_config("ziplora", **options))


def test_unit_mergers_are_exactly_the_direct_merge(base) -> None:
    content, style = make_lora(base, 0, text_encoder=True), make_lora(base, 1)
    reference = render(base)
    fuse_into(base, merge_loras([content, style], [0.9, 1.1]))
    try:
        direct = render(base)
    finally:
        unfuse(base)
    assert (direct - reference).abs().max() > 1e-3  # the LoRAs change the images
    ones = ZipMergers(
        {k: torch.ones(m.down.shape[1]) for k, m in content.modules.items() if k.startswith("unet.")},
        {k: torch.ones(m.down.shape[1]) for k, m in style.modules.items()},
    )
    for mergers in (ones, ZipMergers()):  # no merger for a module means a merger of 1
        plan = plan_for(base, content, style, content_weight=0.9, style_weight=1.1, mergers=mergers)
        try:
            assert torch.equal(render(base), direct)
        finally:
            plan.close()
    assert torch.equal(render(base), reference)


def test_a_few_steps_lower_the_objective(base) -> None:
    content, style = make_lora(base, 2, text_encoder=True), make_lora(base, 3)
    refs = references(base)
    start = ziplora_loss(base, content, style, *refs, seed=7)
    mergers, report = train_ziplora(base, content, style, *refs, max_steps=8, seed=0)
    assert report.steps == 8 and not report.converged and report.seconds > 0
    assert ziplora_loss(base, content, style, *refs, mergers, seed=7) < start
    moved = max((m - 1).abs().max().item() for m in mergers.m_c.values())
    assert 0.01 < moved <= 8 * 0.01 * 1.5  # Adam at lr 0.01 moves each entry by about lr per step
    assert not any(k.startswith("text_encoder") for k in (*mergers.m_c, *mergers.m_s))  # UNet mergers only


def fused_objective(pipe, content, style, refs, mergers, w_c, w_s, seed) -> float:
    """The slow reference of the training objective (λ = 0, one draw): every model as fused weights, not hooks."""
    from diffusers import DDPMScheduler

    from lorafuse.families.unet import UNetDenoiser
    from lorafuse.fusion.prompts import encode_prompts

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)

    def eps(state, noisy, t, prompt):
        fuse_into(pipe, state)
        try:
            size = noisy.shape[-1] * pipe.vae_scale_factor
            cond = encode_prompts(
                pipe, [prompt], None, num_images=1, clip_skip=0, height=size, width=size
            ).cond
            return UNetDenoiser(pipe.unet)(noisy, t, cond)
        finally:
            unfuse(pipe)

    total = 0.0
    single = (merge_loras([content], [w_c]), merge_loras([style], [w_s]))
    for ref, alone in zip(refs, single, strict=True):
        # the training objectives' draw order (train/objectives.py): timesteps first, then the noise
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator)
        noise = torch.randn(ref.latents.shape, generator=generator)
        noisy = scheduler.add_noise(ref.latents, noise, t)
        merged = ziplora_lora(content, style, mergers, w_c, w_s)
        total += torch.nn.functional.mse_loss(
            eps(merged, noisy, t, ref.prompt), eps(alone, noisy, t, ref.prompt)
        ).item()
    return total


@torch.no_grad()
def test_training_forward_is_the_fused_model(base) -> None:
    # the hooks that training runs through must compute what is fused afterwards: ε_m, ε_c and ε_s, text
    # encoders included, for linear, 1x1 and 3x3 conv layers
    content, style = make_lora(base, 16, text_encoder=True), make_lora(base, 17, text_encoder=True)
    refs = references(base)
    mergers = random_mergers(content, style, 18)
    hooked = ziplora_loss(base, content, style, *refs, mergers, content_weight=0.8, style_weight=1.2,
                          similarity_weight=0.0, seed=3, draws=1)  # fmt: skip
    at_one = ziplora_loss(base, content, style, *refs, content_weight=0.8, style_weight=1.2,
                          similarity_weight=0.0, seed=3, draws=1)  # fmt: skip
    assert abs(hooked - at_one) > 1e-3 * at_one  # the mergers matter
    expected = fused_objective(base, content, style, refs, mergers, 0.8, 1.2, seed=3)
    assert hooked == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_refactored_lora_is_the_column_merged_update(arch, request) -> None:
    pipe = request.getfixturevalue(arch)
    content, style = make_lora(pipe, 4, text_encoder=True), make_lora(pipe, 5)
    mergers = random_mergers(content, style, 6)
    merged = ziplora_lora(content, style, mergers, content_weight=0.7, style_weight=1.4)
    convs = 0
    for key, module in merged.modules.items():
        expected = torch.zeros(())
        for state, m, w in ((content, mergers.m_c, 0.7), (style, mergers.m_s, 1.4)):
            if key in state.modules:
                delta = state.modules[key].delta_weight().double()
                column = m[key].double() if key in m else torch.ones(delta.shape[1], dtype=torch.float64)
                expected = expected + w * delta * column.view(1, -1, *([1] * (delta.dim() - 2)))
        torch.testing.assert_close(module.delta_weight().double(), expected, rtol=1e-5, atol=1e-7, msg=key)
        assert module.rank == sum(s.modules[key].rank for s in (content, style) if key in s.modules)
        convs += module.down.dim() == 4
    assert convs > 0


def test_files_hold_low_rank_factors_and_vectors_only(sdxl, tmp_path) -> None:
    content, style = make_lora(sdxl, 7), make_lora(sdxl, 8)
    mergers = random_mergers(content, style, 9)
    shapes = {k: r.shape for k, r in base_modules(sdxl).modules.items()}
    lora_path = save_lora(
        ziplora_lora(content, style, mergers), tmp_path / "zip.safetensors", arch="sdxl", base=sdxl
    )
    with safe_open(str(lora_path), framework="pt") as f:
        for name in f.keys():
            assert name.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")), name
            t = f.get_tensor(name)
            assert t.dim() == 0 or min(t.shape[:2]) <= 6, (name, t.shape)  # rank r_c + r_s <= 6, never dense
    assert max(len(s) for s in shapes.values()) == 4  # there were dense-able conv weights to avoid writing
    mergers_path = mergers.save(tmp_path / "mergers.safetensors")
    with safe_open(str(mergers_path), framework="pt") as f:
        assert all(f.get_tensor(name).dim() == 1 for name in f.keys())
    loaded = ZipMergers.load(mergers_path)
    assert loaded.m_c.keys() == mergers.m_c.keys() and loaded.m_s.keys() == mergers.m_s.keys()
    assert all(torch.equal(loaded.m_c[k], v) for k, v in mergers.m_c.items())


def test_plan_learns_fuses_restores_and_reuses_mergers(world, tmp_path) -> None:
    content, style = make_lora(world, 10), make_lora(world, 11)
    reference = render(world)
    options = dict(
        content_image=render_named("teapot_8", "flat"), content_prompt="a photo of a teapot",
        style_image=render_named("car_2", "watercolor"), style_prompt="a car in watercolor style",
        max_steps=2, save_mergers=tmp_path / "m.safetensors",
    )  # fmt: skip
    plan = plan_for(world, content, style, **options)
    try:
        learned = render(world)
        assert (learned - reference).abs().max() > 1e-3
        assert plan.record["training"]["steps"] == 2 and plan.record["fused_modules"] > 0
    finally:
        plan.close()
    assert torch.equal(render(world), reference)
    plan = plan_for(world, content, style, mergers=tmp_path / "m.safetensors")
    try:
        assert torch.equal(render(world), learned)
    finally:
        plan.close()


def test_zero_weights_need_no_references(base) -> None:
    content, style = make_lora(base, 12), make_lora(base, 13)
    reference = render(base)
    plan = plan_for(base, content, style, content_weight=0.0, style_weight=0.0)
    try:
        assert torch.equal(render(base), reference)
    finally:
        plan.close()


def test_mergers_for_other_loras_are_an_error(sd15) -> None:
    content, style = make_lora(sd15, 14), make_lora(sd15, 15)
    bad = ZipMergers({"unet.not.a.module": torch.ones(4)})
    with pytest.raises(UserInputError, match=r"ziplora: .* mergers for 1 modules this LoRA does not have"):
        plan_for(sd15, content, style, mergers=bad)


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({}, r"ziplora: learning the mergers needs content_image, content_prompt, style_image, style_prompt"),
        ({"mergers": "m.safetensors", "lr": 0.0}, r"ziplora: option lr=0.0 is out of range"),
        ({"mergers": "m.safetensors", "max_steps": 2.5}, r"ziplora: .*max_steps: expected int, got 2.5"),
        ({"mergers": "m.safetensors", "stop_similarity": 2}, r"ziplora: option stop_similarity=2(\.0)? is out of range"),
    ],
)  # fmt: skip
def test_bad_options_name_method_and_option(options, pattern) -> None:
    with pytest.raises(UserInputError, match=pattern):
        make_config("ziplora", **options)


def test_similarity_term_is_the_absolute_cosine(world) -> None:
    # L's third term is λ Σ_l |cos(m_c,l, m_s,l)| (ZipLoRA eq. 4). With m_c = (1, 1, 0, …) and m_s = (−1, 0, …) on
    # every shared layer, |cos| = 1/√2 per layer; mkshing's |m_c ⊙ m_s| would give 1 (summed) or 1/d (mean).
    content, style = make_lora(world, 20), make_lora(world, 21)
    refs = references(world)
    shared = [k for k in content.modules if k in style.modules and k.startswith("unet.")]

    def vec(key: str, values: list[float]) -> torch.Tensor:
        v = torch.zeros(content.modules[key].down.shape[1])
        v[: len(values)] = torch.tensor(values)
        return v

    mergers = ZipMergers({k: vec(k, [1.0, 1.0]) for k in shared}, {k: vec(k, [-1.0]) for k in shared})
    lam = 0.5
    with_term = ziplora_loss(world, content, style, *refs, mergers, similarity_weight=lam, seed=2, draws=1)
    without = ziplora_loss(world, content, style, *refs, mergers, similarity_weight=0.0, seed=2, draws=1)
    assert len(shared) > 5
    assert with_term - without == pytest.approx(lam * len(shared) / 2**0.5, rel=1e-5)


def test_learns_mergers_on_flux(flux) -> None:
    # rectified-flow forward process on the transformer: mergers move from 1, and close() restores the base
    from lorafuse.fusion.synthetic import random_lora

    content, style = random_lora(flux, seed=1, rank=4, scale=0.3), random_lora(flux, seed=2, rank=4, scale=0.3)
    image = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)).numpy()
    before = {k: v.clone() for k, v in flux.transformer.state_dict().items()}
    config = make_config("ziplora", content_image=image, content_prompt="a photo of sks dog", style_image=image,
                         style_prompt="watercolor style", max_steps=3)  # fmt: skip
    plan = get_method("ziplora")().plan(flux, content, style, config)
    try:
        assert plan.record["merger_layers"] > 0 and plan.record["training"]["steps"] == 3
    finally:
        plan.close()
    assert all(torch.equal(v, flux.transformer.state_dict()[k]) for k, v in before.items())

