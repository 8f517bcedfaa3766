"""B-LoRA: routing touches only its two blocks (every other weight stays the base's), linear scaling (and the
official quadratic one as an option), clear errors for LoRAs that miss a block; tiny SD1.5, SDXL and the world
model. LoRAs cover the whole UNet and text encoder with random non-zero up AND down, so routing must drop most."""

from __future__ import annotations

import warnings

import pytest
import torch

from lorafuse.errors import LoraFormatError, UserInputError
from lorafuse.fusion.registry import get_method, make_config
from lorafuse.fusion.sampling import sample
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import base_modules, components_of
from lorafuse.lora.validate import LoraCoverageWarning

PROMPT = "a red car in watercolor style"
BLOCKS = {  # the documented presets: the paper's blocks on SDXL and the world UNet, our choice on SD1.5
    "sd15": ("up_blocks.1.attentions.0", "up_blocks.1.attentions.1"),
    "sdxl": ("up_blocks.0.attentions.0", "up_blocks.0.attentions.1"),
    "world": ("up_blocks.0.attentions.0", "up_blocks.0.attentions.1"),
}
PROJ = (".to_q", ".to_k", ".to_v", ".to_out.0")


@pytest.fixture(params=["sd15", "sdxl", "world"])
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def base(arch: str, request: pytest.FixtureRequest):
    return request.getfixturevalue(arch)


def make_lora(pipe, seed: int, keep=lambda key: True, path: str | None = None) -> LoraState:
    """Random LoRA on every Linear / Conv2d (UNet and text encoders) that `keep` accepts."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i, (key, ref) in enumerate(sorted(base_modules(pipe).modules.items())):
        if not keep(key):
            continue
        out_f, in_f, *kernel = ref.shape
        r = 2 + i % 2
        down = torch.randn((r, in_f, *kernel), generator=g) * 0.2
        up = torch.randn((out_f, r, *([1, 1] if kernel else [])), generator=g) * 0.2
        modules[key] = LoraModule(down=down, up=up, alpha=1.0)
    return LoraState(modules=modules, source_path=path)


def in_block(key: str, block: str) -> bool:
    return key.startswith(f"unet.{block}.") and key.endswith(PROJ)


def weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.clone()
        for name, root in components_of(pipe).items()
        for key, value in root.state_dict().items()
    }


def render(pipe) -> torch.Tensor:
    return sample(pipe, PROMPT, steps=2, seed=0, output="latent", progress=False).latents


def plan_for(pipe, content, style, **options):
    return get_method("blora")().plan(pipe, content, style, make_config("blora", **options))


def fused_deltas(pipe, content, style, **options) -> dict[str, torch.Tensor]:
    before = weights(pipe)
    plan = plan_for(pipe, content, style, **options)
    try:
        after = weights(pipe)
    finally:
        plan.close()
    return {k: after[k] - before[k] for k in before}


def test_routing_touches_only_its_blocks(base, arch) -> None:
    content, style = make_lora(base, 0), make_lora(base, 1)
    content_block, style_block = BLOCKS[arch]
    before = weights(base)
    reference = render(base)
    plan = plan_for(base, content, style, content_weight=0.7, style_weight=1.3)
    try:
        assert (render(base) - reference).abs().max() > 1e-3
        after = weights(base)
        routed = 0
        for name, w in after.items():
            key = name.removesuffix(".weight")
            if name.endswith(".weight") and in_block(key, content_block):
                expected = before[name] + 0.7 * content.modules[key].delta_weight(w.shape)
            elif name.endswith(".weight") and in_block(key, style_block):
                expected = before[name] + 1.3 * style.modules[key].delta_weight(w.shape)
            else:
                assert torch.equal(w, before[name]), f"{name} is outside the B-LoRA blocks but changed"
                continue
            torch.testing.assert_close(w, expected, rtol=0, atol=1e-6, msg=name)
            routed += 1
        assert routed == plan.record["fused_modules"] > 0
        assert plan.record["content_blocks"] == [content_block]
        assert plan.record["style_blocks"] == [style_block]
    finally:
        plan.close()
    assert all(torch.equal(v, before[k]) for k, v in weights(base).items())
    assert torch.equal(render(base), reference)


def test_scaling_is_linear_and_official_is_quadratic(base, arch) -> None:
    content, style = make_lora(base, 2), make_lora(base, 3)
    one = fused_deltas(base, content, style, content_weight=1.0, style_weight=1.0)
    linear = fused_deltas(base, content, style, content_weight=2.0, style_weight=-0.5)
    quadratic = fused_deltas(
        base, content, style, content_weight=2.0, style_weight=-0.5, scaling="official_quadratic"
    )
    content_block, style_block = BLOCKS[arch]
    checked = 0
    for name, d in one.items():
        key = name.removesuffix(".weight")
        for block, w in ((content_block, 2.0), (style_block, -0.5)):
            if name.endswith(".weight") and in_block(key, block):
                assert d.abs().max() > 0
                torch.testing.assert_close(linear[name], w * d, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(quadratic[name], w * w * d, rtol=1e-5, atol=1e-6)
                checked += 1
    assert checked > 0


def test_zero_weights_give_the_base(base) -> None:
    content, style = make_lora(base, 4), make_lora(base, 5)
    reference = render(base)
    plan = plan_for(base, content, style, content_weight=0.0, style_weight=0.0)
    try:
        assert torch.equal(render(base), reference)
    finally:
        plan.close()


def test_missing_block_is_an_error_naming_file_method_and_block(base, arch) -> None:
    content_block, style_block = BLOCKS[arch]
    content = make_lora(base, 6, path="dog_blora.safetensors")
    # a "style" LoRA trained on the content block only: it has nothing for the style block
    style = make_lora(base, 7, keep=lambda key: in_block(key, content_block), path="ink_blora.safetensors")
    before = weights(base)
    with pytest.raises(LoraFormatError) as err:
        plan_for(base, content, style)
    message = str(err.value)
    assert "ink_blora.safetensors" in message and "blora" in message and style_block in message
    assert all(torch.equal(v, before[k]) for k, v in weights(base).items())  # nothing was fused


def test_partly_covered_block_warns(sdxl) -> None:
    content_block, style_block = BLOCKS["sdxl"]
    content = make_lora(sdxl, 8, keep=lambda key: in_block(key, content_block) and "attn1" in key)
    style = make_lora(sdxl, 9, keep=lambda key: in_block(key, style_block))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_for(sdxl, content, style)
        plan.close()
    messages = [str(w.message) for w in caught if issubclass(w.category, LoraCoverageWarning)]
    assert any(content_block in m and "attn2" in m for m in messages), messages


def test_custom_blocks(sd15) -> None:
    content, style = make_lora(sd15, 10), make_lora(sd15, 11)
    blocks = ("up_blocks.2.attentions.0", "up_blocks.3.attentions.2")
    deltas = fused_deltas(sd15, content, style, content_blocks=blocks[:1], style_blocks=blocks[1:])
    changed = [k.removesuffix(".weight") for k, d in deltas.items() if d.abs().max() > 0]
    for block in blocks:
        assert any(in_block(k, block) for k in changed), block
    assert all(in_block(k, blocks[0]) or in_block(k, blocks[1]) for k in changed)


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"scaling": "squared"}, r"blora: option scaling='squared'"),
        ({"content_blocks": ("up_blocks.0.attentions.0",), "style_blocks": ("up_blocks.0.attentions.0",)},
         r"blora: blocks \['up_blocks.0.attentions.0'\] are in both"),
        ({"content_blocks": ()}, r"blora: option content_blocks must be a non-empty list"),
        ({"content_weight": 9.0}, r"blora: option content_weight=9.0 is out of range"),
    ],
)  # fmt: skip
def test_bad_options_name_method_and_option(options, pattern) -> None:
    with pytest.raises(UserInputError, match=pattern):
        make_config("blora", **options)


def test_unknown_block_names_closest(sd15) -> None:
    content, style = make_lora(sd15, 12), make_lora(sd15, 13)
    with pytest.raises(UserInputError, match=r"blora: the sd15 UNet has no block 'up_blocks.0.attentions.0'"):
        plan_for(sd15, content, style, content_blocks=("up_blocks.0.attentions.0",))
    with pytest.raises(
        UserInputError, match=r"blora: block up_blocks.0.resnets.0 has no attention projections"
    ):
        plan_for(sd15, content, style, style_blocks=("up_blocks.0.resnets.0",))
