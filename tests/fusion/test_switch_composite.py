"""LoRA Switch and LoRA Composite against explicit computations: Switch = fuse the active LoRA (i // τ) mod 2
before step i by hand; Composite = per LoRA, fuse it, run the CFG batch, unfuse; average the guided predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafuse.errors import UserInputError
from lorafuse.fusion.registry import get_method, make_config
from lorafuse.fusion.sampling import sample
from lorafuse.fusion.synthetic import random_lora
from lorafuse.guidance import FunctionHook, cfg_combine
from lorafuse.lora.merge import fuse_into, unfuse

PROMPT = "a red car in the city"
G = 6.0


@pytest.fixture(params=["sd15", "sdxl", "world"])
def arch_pipe(request):
    return request.getfixturevalue(request.param)


def pair(pipe):
    return (random_lora(pipe, seed=1, rank=(2, 4), scale=0.3), random_lora(pipe, seed=2, rank=4, scale=0.25))


def run(pipe, hooks=(), guidance=G, steps=5):
    return sample(pipe, PROMPT, steps=steps, seed=1, guidance=guidance, hooks=hooks, progress=False).images


def plan_of(name, pipe, content, style, **options):
    return get_method(name)().plan(pipe, content, style, make_config(name, **options))


def fused_run(pipe, state, weight, steps=5):
    fuse_into(pipe, state, weight)
    try:
        return run(pipe, steps=steps)
    finally:
        unfuse(pipe)


@pytest.mark.parametrize("mechanism", ["swap", "adapter", "inplace"])
def test_switch_rotation_equals_explicit_fusing(arch_pipe, mechanism) -> None:
    content, style = pair(arch_pipe)
    w = {0: (content, 0.9), 1: (style, 1.1)}
    plan = plan_of("switch", arch_pipe, content, style, tau=2, content_weight=0.9, style_weight=1.1,
                   mechanism=mechanism)  # fmt: skip
    try:
        ours = run(arch_pipe, plan.hooks)
        assert plan.record["active"] == [0, 0, 1, 1, 0]
    finally:
        plan.close()

    def explicit(i: int, num_steps: int, unet) -> None:
        unfuse(arch_pipe)
        state, weight = w[(i // 2) % 2]
        fuse_into(arch_pipe, state, weight)

    try:
        reference = run(arch_pipe, [FunctionHook(explicit)])
    finally:
        unfuse(arch_pipe)
    # not trivially one LoRA: differs from content-only and style-only runs
    assert np.abs(ours - fused_run(arch_pipe, content, 0.9)).max() > 1e-2
    assert np.abs(ours - fused_run(arch_pipe, style, 1.1)).max() > 1e-2
    np.testing.assert_allclose(ours, reference, rtol=0, atol=0 if mechanism in ("swap", "inplace") else 2e-4)


@pytest.mark.parametrize("mechanism", ["swap", "adapter", "inplace"])
def test_composite_averages_guided_predictions(arch_pipe, mechanism) -> None:
    content, style = pair(arch_pipe)
    plan = plan_of("composite", arch_pipe, content, style, content_weight=1.2, style_weight=0.7,
                   mechanism=mechanism)  # fmt: skip
    try:
        ours = run(arch_pipe, guidance=plan.guidance(G), steps=4)
    finally:
        plan.close()

    def explicit(model_fn, latents, t, step_index, num_steps, cond):
        preds = []
        for state, weight in ((content, 1.2), (style, 0.7)):
            fuse_into(arch_pipe, state, weight)
            try:
                eps = model_fn(torch.cat([latents, latents]), t, cond.both())  # (2B, C, h, w): uncond, cond
            finally:
                unfuse(arch_pipe)
            eps_u, eps_c = eps.chunk(2)
            preds.append(cfg_combine(eps_u, eps_c, G))
        return (preds[0] + preds[1]) / 2

    reference = run(arch_pipe, guidance=explicit, steps=4)
    assert np.abs(ours - fused_run(arch_pipe, content, 1.2, steps=4)).max() > 1e-2
    assert np.abs(ours - fused_run(arch_pipe, style, 0.7, steps=4)).max() > 1e-2
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6 if mechanism in ("swap", "inplace") else 2e-4)


def test_text_encoder_parts_are_summed(sd15) -> None:
    # Prompts are encoded once, before step 0: the text-encoder updates of both LoRAs act together.
    keep = lambda ref: ref.component == "text_encoder" or ref.path.endswith("to_q")  # noqa: E731
    content = random_lora(sd15, seed=3, rank=2, scale=0.2, keep=keep)
    style = random_lora(sd15, seed=4, rank=2, scale=0.2, keep=keep)
    n_te = sum(1 for k in content.modules if k.startswith("text_encoder"))
    for name in ("switch", "composite"):
        plan = plan_of(name, sd15, content, style)
        try:
            assert plan.record["fused_modules"] == n_te > 0
            assert plan.record["switched_layers"] == len(content.modules) - n_te
        finally:
            plan.close()


@pytest.mark.parametrize(("name", "options", "match"), [
    ("switch", {"tau": 0}, "tau"), ("switch", {"mechanism": "x"}, "mechanism"),
    ("composite", {"mechanism": "x"}, "mechanism"), ("composite", {"style_weight": float("nan")}, "style_weight"),
])  # fmt: skip
def test_bad_options(name, options, match) -> None:
    with pytest.raises(UserInputError, match=f"{name}.*{match}"):
        make_config(name, **options)


@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_switch_official_matches_the_official_callback(arch, request) -> None:
    # The official code switches after step i when i > 0 and i % τ == 0 (LoRA 0 runs τ + 1 steps), applies every
    # LoRA at 0.8 and encodes the prompt with LoRA 0 alone. Reference: the prompt encoded with 0.8 w_c ΔW_c fused,
    # then before each step the active LoRA fused at 0.8 w by hand.
    sd15 = request.getfixturevalue(arch)  # the UNet, or FLUX.1's transformer (attn.to_q / to_v) and CLIP encoder
    keep = lambda ref: ref.component == "text_encoder" or ref.path.endswith(("to_q", "to_v"))  # noqa: E731
    content = random_lora(sd15, seed=5, rank=2, scale=0.3, keep=keep)
    style = random_lora(sd15, seed=6, rank=2, scale=0.3, keep=keep)
    plan = plan_of("switch", sd15, content, style, tau=2, content_weight=0.9, style_weight=1.1, official=True,
                   mechanism="swap")  # precomputed fused weights: the same rounding as fusing by hand
    try:
        ours = run(sd15, plan.hooks)
        assert plan.record["active"] == [0, 0, 0, 1, 1] and plan.record["official"] is True
    finally:
        plan.close()
    w = {0: (content, 0.8 * 0.9), 1: (style, 0.8 * 1.1)}

    def explicit(i: int, num_steps: int, unet) -> None:
        unfuse(sd15)
        fuse_into(sd15, *w[0 if i <= 2 else (i - 1) // 2 % 2])

    fuse_into(sd15, *w[0])  # the prompt is encoded before step 0: content's text-encoder part only
    try:
        reference = run(sd15, [FunctionHook(explicit)])
    finally:
        unfuse(sd15)
    # the text-encoder part is fused as a rank-concatenated sum (w·B) A, the reference as w·(B A): rounding only
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)
    plain = plan_of("switch", sd15, content, style, tau=2, content_weight=0.9, style_weight=1.1)
    try:
        assert np.abs(run(sd15, plain.hooks) - ours).max() > 1e-2  # the option changes the images
    finally:
        plain.close()


@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_composite_official_is_every_lora_at_0_8(arch, request) -> None:
    sd15 = request.getfixturevalue(arch)
    content, style = pair(sd15)
    images = []
    for options in ({"official": True}, {"content_weight": 0.8, "style_weight": 0.8}, {}):
        plan = plan_of("composite", sd15, content, style, **options)
        try:
            images.append(run(sd15, guidance=plan.guidance(G), steps=3))
        finally:
            plan.close()
    np.testing.assert_array_equal(images[0], images[1])
    assert np.abs(images[0] - images[2]).max() > 1e-3


def test_inplace_keeps_no_device_copy_and_restores_bit_for_bit(sd15) -> None:
    # "inplace" rewrites the layer's own tensor (no fused copy beside it) and puts W0 back exactly
    from lorafuse.fusion.common import resolve
    from lorafuse.fusion.synthetic import random_lora
    from lorafuse.fusion.variants import BASE, make_variants

    content, style = random_lora(sd15, seed=1, scale=0.3), random_lora(sd15, seed=2, scale=0.3)
    refs_c, refs_s = resolve(sd15, content), resolve(sd15, style)
    layers = sorted(set(refs_c.values()), key=lambda r: r.path)
    before = {k: v.clone() for k, v in sd15.unet.state_dict().items()}
    sources = [(content, refs_c, 0.8), (style, refs_s, 1.2)]
    swap = make_variants("swap", sd15, layers, sources, ("a", "b"))
    swap.select_all(1)
    want = [sd15.unet.get_submodule(r.path).weight.data.clone() for r in layers]
    swap.close()
    inplace = make_variants("inplace", sd15, layers, sources, ("a", "b"))
    pointers = [sd15.unet.get_submodule(r.path).weight.data_ptr() for r in layers]
    for variant in (0, 1, 0, 1):  # back and forth between the LoRAs, as Switch and Composite do
        inplace.select_all(variant)
    got = [sd15.unet.get_submodule(r.path).weight.data for r in layers]
    assert [g.data_ptr() for g in got] == pointers  # the same storage: no second copy on the device
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))  # equals swap's fused weight
    assert any(not torch.equal(g, before[f"{r.path}.weight"]) for g, r in zip(got, layers, strict=True))
    inplace.select_all(BASE)
    inplace.close()
    assert all(torch.equal(v, sd15.unet.state_dict()[k]) for k, v in before.items())


def test_mechanism_bytes_counts_copies_and_factors() -> None:
    from lorafuse.fusion.variants import mechanism_bytes

    out = mechanism_bytes([(8, 4), (6, 6)], [(2, 0), (1, 3)], weight_bytes=2)
    assert out["swap"] == {"device": (32 + 36 + 36) * 2, "host": 0}
    factors = 2 * (8 + 4) + 1 * 12 + 3 * 12
    assert out["adapter"]["device"] == factors * 4
    assert out["inplace"] == {"device": factors * 4 + 36 * 4, "host": (32 + 36) * 2}
