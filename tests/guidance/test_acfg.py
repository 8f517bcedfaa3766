"""Asymmetric CFG (docs/algorithms.md §7.5): one batched forward with per-sample adapters, checked against separate forwards,
plain CFG (equal branches) and the backbone alone (λ = 0)."""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import pytest
import torch

from lorafuse.errors import UserInputError
from lorafuse.guidance import ClassifierFreeGuidance, Conditioning, GuidanceCond, UNetDenoiser
from lorafuse.guidance.acfg import AcfgSchedule, AsymmetricCFG, BranchAdapter
from lorafuse.lora.inject import inject_lora, set_enabled_adapters
from lorafuse.lora.presets import resolve_layers
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import base_modules
from lorafuse.models.tiny import tiny_sd15_pipeline

T = torch.tensor(500)
ATOL = 2e-4  # 2B-row vs B-row batches take different CPU kernels (see test_cfg.py)
G = 5.0


def random_lora(pipe, paths, seed) -> LoraState:
    """Random non-zero up and down on the UNet modules `paths` (never the zero-B init)."""
    g = torch.Generator().manual_seed(seed)
    refs = {ref.path: key for key, ref in base_modules(pipe).modules.items() if ref.component == "unet"}
    modules = {}
    for path in paths:
        key = refs[path]
        out_f, in_f, *kernel = base_modules(pipe).modules[key].shape
        down = torch.randn((2, in_f, *kernel), generator=g) * 0.2
        up = torch.randn((out_f, 2, *([1, 1] if kernel else [])), generator=g) * 0.2
        modules[key] = LoraModule(down=down, up=up, alpha=None)
    return LoraState(modules=modules)


@functools.lru_cache(maxsize=1)
def _setup():
    pipe = tiny_sd15_pipeline(0)
    base_unet = copy.deepcopy(pipe.unet)
    content = resolve_layers(pipe, "craft_content", "sd15")
    style = resolve_layers(pipe, "craft_style", "sd15")
    state = random_lora(pipe, content, 1)
    state.modules.update(random_lora(pipe, style, 2).modules)
    inject_lora(pipe, state, "craft")
    adapter = BranchAdapter(pipe.unet, "craft", content, style)
    g = torch.Generator().manual_seed(0)
    dim = pipe.unet.config.cross_attention_dim
    cond = GuidanceCond(
        Conditioning(torch.randn(2, 7, dim, generator=g)), Conditioning(torch.randn(2, 7, dim, generator=g))
    )
    latents = torch.randn(2, 4, 8, 8, generator=g)
    return pipe, base_unet, adapter, cond, latents


@pytest.fixture
def setup():
    pipe, base_unet, adapter, cond, latents = _setup()
    set_enabled_adapters(pipe, ["craft"])
    adapter.set_weights(1.0, 1.0)
    return pipe, base_unet, adapter, cond, latents


def eps(unet, latents, c) -> torch.Tensor:
    with torch.no_grad():
        return UNetDenoiser(unet)(latents, T, c)


def with_lora(pipe, adapter, omega, latents, c) -> torch.Tensor:
    """The slow reference: an ordinary forward with the adapter enabled at per-group weights ω."""
    set_enabled_adapters(pipe, ["craft"])
    adapter.set_weights(*omega)
    return eps(pipe.unet, latents, c)


def guided(policy, pipe, latents, cond, step=3, num_steps=10) -> torch.Tensor:
    with torch.no_grad():
        return policy(UNetDenoiser(pipe.unet), latents, T, step, num_steps, cond)


def test_each_lora_group_acts(setup) -> None:
    pipe, base_unet, adapter, cond, latents = setup
    base = eps(base_unet, latents, cond.cond)
    for omega in ((1.0, 0.0), (0.0, 1.0)):
        assert (with_lora(pipe, adapter, omega, latents, cond.cond) - base).abs().max() > 1e-3
    # weight 0 on both groups is the base, exactly
    torch.testing.assert_close(
        with_lora(pipe, adapter, (0.0, 0.0), latents, cond.cond), base, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("kind", ["window", "smooth", "constant"])
def test_batched_per_sample_forward_equals_separate_forwards(setup, kind) -> None:
    pipe, base_unet, adapter, cond, latents = setup
    schedule = AcfgSchedule(kind, lambda_c=0.8, lambda_s=0.6)
    for step in (0, 4, 9):  # content only, both, style only under the window schedule
        omega = schedule.weights(step, 10)
        got = guided(AsymmetricCFG(G, adapter, schedule), pipe, latents, cond, step)
        eps_u = eps(base_unet, latents, cond.uncond)  # uncond on W' alone
        eps_c = with_lora(pipe, adapter, omega, latents, cond.cond)
        torch.testing.assert_close(got, eps_u + G * (eps_c - eps_u), rtol=0, atol=ATOL * G)
        # asymmetry is real: LoRA on the uncond rows would change the result
        assert (with_lora(pipe, adapter, omega, latents, cond.uncond) - eps_u).abs().max() > 1e-3


def test_equal_branches_equal_plain_cfg(setup) -> None:
    """symmetric=True puts the LoRA on both branches: plain CFG on W' + ω ΔW."""
    pipe, base_unet, adapter, cond, latents = setup
    schedule = AcfgSchedule("constant", lambda_c=0.7, lambda_s=0.9)
    got = guided(AsymmetricCFG(G, adapter, schedule, symmetric=True), pipe, latents, cond)
    set_enabled_adapters(pipe, ["craft"])
    adapter.set_weights(0.7, 0.9)
    plain = guided(ClassifierFreeGuidance(G), pipe, latents, cond)
    torch.testing.assert_close(got, plain, rtol=0, atol=ATOL * G)
    assert (got - guided(AsymmetricCFG(G, adapter, schedule), pipe, latents, cond)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["window", "smooth", "constant"])
def test_zero_lambdas_equal_the_backbone_alone(setup, kind) -> None:
    pipe, base_unet, adapter, cond, latents = setup
    got = guided(AsymmetricCFG(G, adapter, AcfgSchedule(kind, 0.0, 0.0)), pipe, latents, cond)
    ref = guided(ClassifierFreeGuidance(G), SimpleNamespace(unet=base_unet), latents, cond)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_single_branch_scales(setup, scale) -> None:
    pipe, base_unet, adapter, cond, latents = setup
    got = guided(AsymmetricCFG(scale, adapter, AcfgSchedule("constant", 1.0, 1.0)), pipe, latents, cond)
    if scale == 0:  # only the unconditional rows: W' alone
        assert torch.equal(got, eps(base_unet, latents, cond.uncond))
    else:
        ref = with_lora(pipe, adapter, (1.0, 1.0), latents, cond.cond)
        torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)


def test_window_schedule_matches_the_paper_at_50_steps() -> None:
    table = AcfgSchedule("window").table(50)
    content = [i + 1 for i, (wc, _) in enumerate(table) if wc]  # 1-based steps, as the paper counts
    style = [i + 1 for i, (_, ws) in enumerate(table) if ws]
    assert content == list(range(1, 36)) and style == list(range(15, 51))


def test_smooth_schedule_moves_from_content_to_style() -> None:
    table = AcfgSchedule("smooth", lambda_c=0.5, lambda_s=2.0).table(20)
    wc, ws = zip(*table, strict=True)
    assert table[0] == (0.5, 0.0)
    assert all(a >= b for a, b in zip(wc, wc[1:], strict=False)) and all(
        a <= b for a, b in zip(ws, ws[1:], strict=False)
    )
    assert all(abs(c / 0.5 + s / 2.0 - 1) < 1e-12 for c, s in table)  # φ + (1 − φ) = 1


def test_record_and_errors(setup) -> None:
    pipe, base_unet, adapter, cond, latents = setup
    record: dict = {}
    guided(
        AsymmetricCFG(G, adapter, AcfgSchedule("window"), record=record),
        pipe,
        latents,
        cond,
        step=0,
        num_steps=4,
    )
    assert record["omega"] == [[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]  # u = i/4 vs (0, .7), (.28, 1)
    with pytest.raises(UserInputError, match="unknown ACFG schedule"):
        AcfgSchedule("cosine")
    with pytest.raises(UserInputError, match="disjoint"):
        BranchAdapter(pipe.unet, "craft", adapter_paths := ["conv_in"], adapter_paths)
    with pytest.raises(UserInputError, match="holds no LoRA adapter"):
        BranchAdapter(pipe.unet, "craft", ["conv_in"], [])
