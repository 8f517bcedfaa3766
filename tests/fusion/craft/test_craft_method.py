"""The "craft" fusion method: routing to disjoint layer sets, λ from markers, the backbone host, exact restore."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch

from lorafuse.errors import UserInputError
from lorafuse.fusion.craft import Craft, CraftConfig
from lorafuse.fusion.registry import get_method, make_config
from lorafuse.fusion.sampling import sample
from lorafuse.lora.inject import adapter_names
from lorafuse.lora.presets import resolve_layers
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import base_modules
from lorafuse.lora.validate import LoraCoverageWarning
from lorafuse.models.tiny import tiny_sd15_pipeline

PROMPT = "a photo of a sks dog <c> in watercolor style <s>"


def random_lora(pipe, paths, seed, scale=0.3) -> LoraState:
    g = torch.Generator().manual_seed(seed)
    by_path = {
        ref.path: (key, ref) for key, ref in base_modules(pipe).modules.items() if ref.component == "unet"
    }
    modules = {}
    for path in paths:
        key, ref = by_path[path]
        out_f, in_f, *kernel = ref.shape
        down = torch.randn((2, in_f, *kernel), generator=g) * scale
        up = torch.randn((out_f, 2, *([1, 1] if kernel else [])), generator=g) * scale
        modules[key] = LoraModule(down=down, up=up, alpha=None)
    return LoraState(modules=modules)


@functools.lru_cache(maxsize=1)
def _base():
    pipe = tiny_sd15_pipeline(0)
    content = random_lora(pipe, resolve_layers(pipe, "craft_content", "sd15"), 1)
    style = random_lora(pipe, resolve_layers(pipe, "craft_style", "sd15"), 2)
    return pipe, content, style


@pytest.fixture
def base():
    pipe, content, style = _base()
    return copy.deepcopy(pipe), content, style


def run(pipe, plan=None, prompt="a photo of a sks dog in watercolor style", steps=3) -> torch.Tensor:
    guidance = plan.guidance(5.0) if plan is not None else 5.0
    hooks = plan.hooks if plan is not None else ()
    out = sample(pipe, prompt, steps=steps, guidance=guidance, hooks=hooks, output="latent", progress=False)
    return out.latents


def snapshot(unet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in unet.state_dict().items()}


def test_registered_with_typed_options() -> None:
    assert get_method("craft") is Craft
    cfg = make_config("craft", schedule="smooth", lambda_c=0.5)
    assert isinstance(cfg, CraftConfig) and cfg.schedule == "smooth"
    with pytest.raises(UserInputError, match="schedule"):
        make_config("craft", schedule="cosine")
    with pytest.raises(UserInputError, match="tags no text"):
        make_config("craft", prompt="<c> a dog")


def test_prepare_prompt_strips_markers() -> None:
    clean, cfg = Craft.prepare_prompt(PROMPT, CraftConfig())
    assert clean == "a photo of a sks dog in watercolor style" and cfg.prompt == PROMPT


def test_craft_changes_the_image_and_close_restores_the_base(base) -> None:
    pipe, content, style = base
    before, ref = snapshot(pipe.unet), run(pipe)
    plan = Craft().plan(pipe, content, style, CraftConfig(prompt=PROMPT))
    try:
        assert adapter_names(pipe) == ["craft"]
        fused = run(pipe, plan)
    finally:
        plan.close()
    assert (fused - ref).abs().max() > 1e-3
    assert plan.record["lambda_c"] == 1.0 and plan.record["lambda_s"] == 1.0
    assert plan.record["lambda_source"] == "markers" and len(plan.record["omega"]) == 3
    assert plan.record["content"]["dropped_modules"] == 0
    assert adapter_names(pipe) == []
    after = snapshot(pipe.unet)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(run(pipe), ref)


@pytest.mark.parametrize(
    "config",
    [
        CraftConfig(prompt="a photo of a sks dog in watercolor style"),  # no markers: both branches off
        CraftConfig(lambda_c=0.0, lambda_s=0.0),
        CraftConfig(content_weight=0.0, style_weight=0.0, schedule="smooth"),
    ],
)
def test_zero_aggregation_is_the_base_exactly(base, config) -> None:
    pipe, content, style = base
    ref = run(pipe)
    plan = Craft().plan(pipe, content, style, config)
    try:
        assert torch.equal(run(pipe, plan), ref)
    finally:
        plan.close()


def test_one_marker_runs_one_branch(base) -> None:
    pipe, content, style = base
    plan = Craft().plan(
        pipe, content, style, CraftConfig(prompt="a sks dog <c> on a beach", schedule="constant")
    )
    try:
        run(pipe, plan)
    finally:
        plan.close()
    assert plan.record["lambda_s"] == 0.0 and all(ws == 0.0 for _, ws in plan.record["omega"])


def test_loras_are_cut_to_their_layer_sets(base) -> None:
    pipe, content, style = base
    everywhere = random_lora(pipe, resolve_layers(pipe, "all", "sd15"), 3)
    with pytest.warns(LoraCoverageWarning, match="not applied"):
        plan = Craft().plan(pipe, everywhere, style, CraftConfig())
    plan.close()
    kept = plan.record["content"]
    assert kept["kept_modules"] == len(content.modules) and kept["dropped_modules"] > 0


def test_overlapping_layer_sets_are_errors_naming_modules(base) -> None:
    pipe, content, style = base
    shared = resolve_layers(pipe, "craft_content", "sd15")[0]
    with pytest.raises(UserInputError, match="disjoint.*" + shared.replace(".", r"\.")):
        Craft().plan(pipe, content, style, CraftConfig(style_layers=(r"down_blocks\.2\.attentions",)))
    both = random_lora(pipe, [shared], 4)
    with pytest.raises(UserInputError, match="1 modules are in both"):
        Craft().plan(pipe, both, both, CraftConfig(content_layers="lora", style_layers="lora"))
    assert adapter_names(pipe) == []


def test_a_lora_outside_its_layer_set_is_an_error(base) -> None:
    pipe, content, style = base
    with pytest.raises(UserInputError, match="no module in the content layers"):
        Craft().plan(pipe, style, style, CraftConfig())
    assert adapter_names(pipe) == []


def test_backbone_hosts_the_loras_and_is_restored(base, tmp_path) -> None:
    pipe, content, style = base
    backbone = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        backbone.down_blocks[0].resnets[0].conv1.weight.mul_(0.5)
    backbone.save_pretrained(tmp_path / "bb" / "unet")
    on_backbone = copy.deepcopy(pipe)
    on_backbone.unet = backbone
    before, ref_backbone = snapshot(pipe.unet), run(on_backbone)
    plan = Craft().plan(
        pipe, content, style, CraftConfig(backbone=tmp_path / "bb", lambda_c=0.0, lambda_s=0.0)
    )
    try:
        assert plan.record["backbone"]["swapped_tensors"] == 1
        torch.testing.assert_close(run(pipe, plan), ref_backbone, rtol=0, atol=1e-5)
    finally:
        plan.close()
    after = snapshot(pipe.unet)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_backbone_from_another_base_is_an_error(base, tmp_path) -> None:
    from lorafuse.models.tiny import tiny_unet

    pipe, content, style = base
    tiny_unet("sdxl").save_pretrained(tmp_path / "other" / "unet")
    with pytest.raises(UserInputError, match="does not fit this base UNet"):
        Craft().plan(pipe, content, style, CraftConfig(backbone=tmp_path / "other"))
    assert adapter_names(pipe) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserInputError, match="no such file"):
            CraftConfig(backbone=tmp_path / "missing").validate("craft")
