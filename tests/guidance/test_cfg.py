"""Classifier-free guidance, its per-branch (asymmetric) form and the LoRA Composite average, each checked
against a slow reference built from separate UNet forwards."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from lorafuse.errors import UserInputError
from lorafuse.guidance import (
    COND,
    UNCOND,
    ClassifierFreeGuidance,
    CompositeGuidance,
    GuidanceCond,
    UNetDenoiser,
    cfg_combine,
)

T = torch.tensor(500)
# A batch of 2B rows and two batches of B rows take different CPU kernel paths; through this random-weight UNet
# the rounding grows to ~1e-4 on predictions of size ~1 (measured 8e-5). Guided values scale it by g.
ATOL = 2e-4


def run(guidance, model_fn, latents, cond, step_index=3, num_steps=10):
    return guidance(model_fn, latents, T, step_index, num_steps, cond)


def separate(
    model_fn: UNetDenoiser, latents: torch.Tensor, cond: GuidanceCond
) -> tuple[torch.Tensor, torch.Tensor]:
    """The slow reference: one forward of B rows per branch."""
    return model_fn(latents, T, cond.uncond), model_fn(latents, T, cond.cond)


def test_the_two_branches_differ(model_fn, latents, cond) -> None:
    # Every equality below would hold trivially if the prompt had no effect.
    eps_u, eps_c = separate(model_fn, latents, cond)
    assert (eps_u - eps_c).abs().max() > 1e-3


def test_cfg_equals_two_separate_forwards(model_fn, latents, cond) -> None:
    eps_u, eps_c = separate(model_fn, latents, cond)
    guided = run(ClassifierFreeGuidance(7.5), model_fn, latents, cond)
    assert guided.shape == latents.shape
    torch.testing.assert_close(guided, eps_u + 7.5 * (eps_c - eps_u), rtol=0, atol=ATOL * 7.5)
    assert (guided - eps_c).abs().max() > 1e-3


def test_scale_one_is_the_conditional_prediction(model_fn, latents, cond) -> None:
    eps_u, eps_c = separate(model_fn, latents, cond)
    assert torch.equal(run(ClassifierFreeGuidance(1.0), model_fn, latents, cond), eps_c)
    # The shortcut is the formula: at g = 1 the unconditional prediction cancels.
    torch.testing.assert_close(cfg_combine(eps_u, eps_c, 1.0), eps_c, rtol=0, atol=1e-6)


def test_scale_zero_is_the_unconditional_prediction(model_fn, latents, cond) -> None:
    eps_u, _ = separate(model_fn, latents, cond)
    assert torch.equal(run(ClassifierFreeGuidance(0), model_fn, latents, cond), eps_u)


@pytest.mark.parametrize("scale", [-1.0, math.nan, math.inf, "7", True])
def test_bad_scales_are_refused(scale) -> None:
    with pytest.raises(UserInputError, match="guidance scale"):
        ClassifierFreeGuidance(scale)


@pytest.mark.parametrize(("scale", "labels"), [(7.5, [UNCOND] * 2 + [COND] * 2), (1.0, [COND] * 2)])
def test_branch_context_sees_step_and_row_labels(model_fn, latents, cond, scale, labels) -> None:
    calls = []

    def context(step_index, num_steps, row_labels):
        calls.append((step_index, num_steps, list(row_labels)))
        return contextlib.nullcontext()

    run(
        ClassifierFreeGuidance(scale, branch_context=context),
        model_fn,
        latents,
        cond,
        step_index=4,
        num_steps=9,
    )
    assert calls == [(4, 9, labels)]


def test_equal_branches_equal_plain_cfg(model_fn, latents, cond, adapter) -> None:
    # The adapter on both halves through the per-row path == CFG with the adapter on for the whole model.
    both = ClassifierFreeGuidance(
        5.0, branch_context=lambda i, n, labels: adapter.active([True] * len(labels))
    )
    with adapter.active():
        plain_on = run(ClassifierFreeGuidance(5.0), model_fn, latents, cond)
    plain_off = run(ClassifierFreeGuidance(5.0), model_fn, latents, cond)
    assert (plain_on - plain_off).abs().max() > 1e-3  # the adapter changes the prediction
    assert torch.equal(run(both, model_fn, latents, cond), plain_on)


def test_asymmetric_cfg_equals_the_slow_reference(model_fn, latents, cond, adapter) -> None:
    # CRAFT's ACFG: conditional rows with the adapter, unconditional rows on the base, in one forward.
    acfg = ClassifierFreeGuidance(
        5.0, branch_context=lambda i, n, labels: adapter.active([label == COND for label in labels])
    )
    guided = run(acfg, model_fn, latents, cond)
    eps_u = model_fn(latents, T, cond.uncond)
    with adapter.active():
        eps_c = model_fn(latents, T, cond.cond)
        plain_on = run(ClassifierFreeGuidance(5.0), model_fn, latents, cond)
    torch.testing.assert_close(guided, eps_u + 5.0 * (eps_c - eps_u), rtol=0, atol=ATOL * 5)
    assert (guided - plain_on).abs().max() > 1e-3
    assert (guided - run(ClassifierFreeGuidance(5.0), model_fn, latents, cond)).abs().max() > 1e-3


def test_composite_of_one_is_the_inner_guidance(model_fn, latents, cond) -> None:
    inner = ClassifierFreeGuidance(4.0)
    composite = CompositeGuidance(inner, [contextlib.nullcontext])
    assert torch.equal(run(composite, model_fn, latents, cond), run(inner, model_fn, latents, cond))


def test_composite_averages_the_guided_predictions(model_fn, latents, cond, adapter) -> None:
    inner = ClassifierFreeGuidance(4.0)
    composite = CompositeGuidance(inner, [adapter.active, contextlib.nullcontext])
    with adapter.active():
        with_adapter = run(inner, model_fn, latents, cond)
    without = run(inner, model_fn, latents, cond)
    assert (with_adapter - without).abs().max() > 1e-3
    torch.testing.assert_close(run(composite, model_fn, latents, cond), (with_adapter + without) / 2)


def test_composite_needs_a_context() -> None:
    with pytest.raises(UserInputError, match="at least one"):
        CompositeGuidance(ClassifierFreeGuidance(), [])
