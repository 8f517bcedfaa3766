"""Layer-set presets: they exist on every architecture, pairs meant for fusion are disjoint, CRAFT keeps its
resolution rule, and a preset naming a block the base lacks fails with the closest names."""

from __future__ import annotations

import functools
import re
import tempfile

import pytest
import torch

from lorafuse.errors import UserInputError
from lorafuse.lora.presets import (
    ATTN_PROJ,
    DISJOINT_PAIRS,
    PRESET_NAMES,
    block_names,
    detect_arch,
    preset_rules,
    resolve_layers,
)

ARCHS = ("world", "sd15", "sdxl")


@functools.cache
def _unet(arch: str, real: bool = False):
    """The tiny test UNet of `arch`, or (real=True) the real-size SD1.5 / SDXL UNet on the meta device."""
    if real:
        from lorafuse.lora.archs import reference_components

        return reference_components(arch)["unet"]
    if arch == "world":
        from lorafuse.models.world import fresh_components, world_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            return fresh_components(world_tokenizer(tmp))["unet"]
    from lorafuse.models.tiny import tiny_unet

    return tiny_unet(arch)


def _level(block: str, unet) -> int:
    """Resolution level of a block: 0 = the latent's full size, 1 = half, ..."""
    n = len(unet.config.down_block_types)
    if block.startswith("mid_block"):
        return n - 1
    index = int(block.split(".")[1])
    return index if block.startswith("down_blocks") else n - 1 - index


def _block(path: str) -> str:
    return re.match(r"^((?:down_blocks|up_blocks)\.\d+|mid_block)\.(attentions|resnets)\.\d+", path).group(0)


@pytest.mark.parametrize("arch", ARCHS)
def test_detect_arch(arch):
    assert detect_arch(_unet(arch)) == arch


def test_detect_arch_of_the_real_architectures():
    assert detect_arch(_unet("sd15", real=True)) == "sd15"
    assert detect_arch(_unet("sdxl", real=True)) == "sdxl"


def test_unknown_layout_is_an_error():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            norm_num_groups=16,
        )
    with pytest.raises(UserInputError, match="cannot tell which base-model family"):
        detect_arch(unet)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_every_preset_resolves_on_every_arch(arch, preset):
    layers = resolve_layers(_unet(arch), preset, arch)
    assert layers and layers == sorted(set(layers))
    modules = dict(_unet(arch).named_modules())
    assert all(isinstance(modules[p], (torch.nn.Linear, torch.nn.Conv2d)) for p in layers)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_presets_fit_the_real_size_architectures(arch, preset):
    # The tiny UNets keep the real block layout; this checks the real one itself (SDXL: 10 transformer layers).
    assert resolve_layers(_unet(arch, real=True), preset, arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pair", DISJOINT_PAIRS)
def test_fusion_pairs_are_disjoint(arch, pair):
    a, b = (set(resolve_layers(_unet(arch), p, arch)) for p in pair)
    assert a and b and not a & b


@pytest.mark.parametrize("arch", ARCHS)
def test_blora_is_attention_projections_of_one_block(arch):
    expected = {"sd15": "up_blocks.1", "sdxl": "up_blocks.0", "world": "up_blocks.0"}[arch]
    for role, index in (("content", 0), ("style", 1)):
        layers = resolve_layers(_unet(arch), f"blora_{role}", arch)
        assert {_block(p) for p in layers} == {f"{expected}.attentions.{index}"}
        assert all(re.search(ATTN_PROJ + "$", p) for p in layers)
        # all four projections of both attention layers of every transformer block
        assert len(layers) % 8 == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_craft_content_is_lower_resolution_than_craft_style(arch):
    unet = _unet(arch)
    content = {_block(p) for p in resolve_layers(unet, "craft_content", arch)}
    style = {_block(p) for p in resolve_layers(unet, "craft_style", arch)}
    assert min(_level(b, unet) for b in content) > max(_level(b, unet) for b in style)
    # every attention block of the UNet is in exactly one of the two sets
    attentions = {b for b in block_names(unet) if ".attentions." in b}
    assert {b for b in content | style if ".attentions." in b} == attentions
    # style reaches the highest resolution; content holds the mid block
    assert min(_level(b, unet) for b in style) == 0 and "mid_block.attentions.0" in content


@pytest.mark.parametrize("arch", ARCHS)
def test_default_is_kohyas_transformer_layers(arch):
    unet = _unet(arch)
    layers = set(resolve_layers(unet, "default", arch))
    expected = {
        name
        for name, m in unet.named_modules()
        if ".attentions." in name
        and (isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)))
    }
    assert layers == expected
    assert set(resolve_layers(unet, "attn", arch)) < layers < set(resolve_layers(unet, "all", arch))


def test_preset_block_missing_names_the_closest_blocks():
    with pytest.raises(UserInputError) as info:
        resolve_layers(_unet("sd15"), "blora_content", "sdxl")  # SD1.5 has no attention in up_blocks.0
    message = str(info.value)
    assert "up_blocks.0.attentions.0" in message and "closest blocks of this base" in message
    assert "up_blocks.1.attentions.0" in message


def test_regexes_select_modules_and_must_match_something():
    layers = resolve_layers(_unet("world"), [r"up_blocks\.1\..*to_q$"])
    assert layers and all(p.startswith("up_blocks.1.") and p.endswith("to_q") for p in layers)
    with pytest.raises(UserInputError, match="selects no Linear / Conv2d module"):
        resolve_layers(_unet("world"), [r"no_such_layer"])


def test_unknown_preset_and_arch():
    with pytest.raises(UserInputError, match="unknown layer preset"):
        resolve_layers(_unet("world"), "everything", "world")
    with pytest.raises(UserInputError, match="unknown base-model family 'sd3'"):
        preset_rules("attn", "sd3")


def test_presets_see_through_injected_peft_layers():
    from lorafuse.models.tiny import tiny_pipeline
    from lorafuse.train.config import NetworkConfig
    from lorafuse.train.network import create_network

    pipe = tiny_pipeline("sd15")
    before = resolve_layers(pipe, "all", "sd15")
    create_network(pipe, NetworkConfig(layers="attn", network_train_unet_only=True), "sd15")
    assert resolve_layers(pipe, "all", "sd15") == before


@pytest.mark.parametrize("arch", ARCHS)
def test_joint_blora_is_both_blocks_in_one_lora(arch):
    # B-LoRA trains ONE LoRA on the content and the style block together (the official SDXL training script)
    unet = _unet(arch)
    joint = resolve_layers(unet, "blora", arch)
    parts = [set(resolve_layers(unet, f"blora_{role}", arch)) for role in ("content", "style")]
    assert set(joint) == parts[0] | parts[1] and parts[0] and parts[1]
    assert "blora" in PRESET_NAMES


def test_joint_blora_is_refused_on_flux_by_name_with_the_reason():
    from lorafuse.models.load import load_base_pipeline

    with pytest.raises(UserInputError, match="blora is not available on FLUX.1: .*no FLUX blocks"):
        resolve_layers(load_base_pipeline("flux-tiny"), "blora")
