"""The fast ACFG path (`lora.row_split`, mechanism "merged") gives the images of peft's per-sample path, and the
plan puts every module back on close."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from peft.tuners.lora import LoraLayer

from lorafuse.errors import UserInputError
from lorafuse.fusion.craft import Craft, CraftConfig
from lorafuse.fusion.sampling import sample
from lorafuse.fusion.synthetic import random_lora
from lorafuse.lora.presets import resolve_layers
from lorafuse.lora.row_split import RowSplitLayer, contiguous_split
from lorafuse.lora.state import LoraState
from lorafuse.models.tiny import tiny_sd15_pipeline

# W + ΔW merged sums in another order than W x + B(A x): float rounding, amplified by g = 5 over 4 steps
ATOL = 1e-3
PROMPT = "a photo of a sks dog <c> in watercolor style <s>"


def on_layers(pipe, preset: str, seed: int) -> LoraState:
    """Random non-zero up and down (never the zero-B init) on a layer preset, convs included."""
    paths = set(resolve_layers(pipe, preset, "sd15"))
    keep = lambda ref: ref.component == "unet" and ref.path in paths  # noqa: E731
    return random_lora(pipe, seed=seed, rank=3, scale=0.2, keep=keep)


@functools.lru_cache(maxsize=1)
def _base():
    pipe = tiny_sd15_pipeline(0)
    content, style = on_layers(pipe, "craft_content", 1), on_layers(pipe, "craft_style", 2)
    return pipe, content, style


@pytest.fixture
def base():
    pipe, content, style = _base()
    return copy.deepcopy(pipe), content, style


def images(pipe, content, style, steps=4, guidance=5.0, **options) -> torch.Tensor:
    plan = Craft().plan(pipe, content, style, CraftConfig(prompt=PROMPT, **options))
    try:
        out = sample(pipe, ["a sks dog in watercolor style", "a sks cat"], steps=steps, guidance=plan.guidance(guidance),
                     output="latent", progress=False)  # fmt: skip
    finally:
        plan.close()
    return out.latents


def test_the_style_set_has_convolutions(base) -> None:
    pipe, _, style = base
    assert any(len(m.down.shape) == 4 and m.down.shape[-1] == 3 for m in style.modules.values())


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"schedule": "smooth"},
        {"schedule": "constant", "lambda_c": 0.6, "lambda_s": 0.8},
        {"symmetric": True},
    ],
)
def test_merged_rows_equal_peft_per_sample(base, options) -> None:
    pipe, content, style = base
    plain = sample(pipe, ["a sks dog in watercolor style", "a sks cat"], steps=4, guidance=5.0, output="latent",
                   progress=False).latents  # fmt: skip
    peft_path = images(pipe, content, style, acfg_mechanism="peft", **options)
    merged = images(pipe, content, style, acfg_mechanism="merged", **options)
    # the LoRAs move the latents by far more than the tolerance, so equality below means something
    assert (peft_path - plain).abs().max() > 50 * ATOL
    torch.testing.assert_close(merged, peft_path, rtol=0, atol=ATOL)


@pytest.mark.parametrize("guidance", [0.0, 1.0])  # one branch only: every row on W, or every row on W + ΔW
def test_single_branch_rows(base, guidance) -> None:
    pipe, content, style = base
    peft_path = images(pipe, content, style, guidance=guidance, acfg_mechanism="peft")
    torch.testing.assert_close(images(pipe, content, style, guidance=guidance), peft_path, rtol=0, atol=ATOL)


def test_close_puts_the_peft_layers_back_then_removes_them(base) -> None:
    pipe, content, style = base
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    plan = Craft().plan(pipe, content, style, CraftConfig(prompt=PROMPT))
    wrapped = [m for m in pipe.unet.modules() if isinstance(m, RowSplitLayer)]
    assert len(wrapped) == len(content.modules) + len(style.modules)
    plan.close()
    assert not any(isinstance(m, RowSplitLayer | LoraLayer) for m in pipe.unet.modules())
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_contiguous_split_and_option_check() -> None:
    assert contiguous_split([False, False, True, True]) == 2
    assert contiguous_split([True, True]) == 0 and contiguous_split([False]) == 1
    assert contiguous_split([True, False]) is None and contiguous_split([False, True, False]) is None
    with pytest.raises(UserInputError, match="acfg_mechanism"):
        CraftConfig(acfg_mechanism="fast").validate("craft")
