"""The family registry: every family detects its own pipelines, checkpoints and LoRA metadata and no other's,
names only blocks its denoiser has, and describes its real-size architecture. One row per family."""

from __future__ import annotations

import re

import pytest
import torch

from lorafuse.errors import UserInputError
from lorafuse.families import FAMILIES, family_of, family_of_checkpoint, family_of_metadata, get_family
from lorafuse.lora.presets import PRESET_NAMES, block_names, resolve_layers
from lorafuse.models.load import load_base_pipeline

# family -> a built-in base of that family (the test-matrix row of a new family goes here)
BASES = {"sd15": "sd15-tiny", "sdxl": "sdxl-tiny", "world": "world-random", "flux": "flux-tiny"}
# a tensor name only that family's single-file checkpoints have
CHECKPOINT_KEYS = {
    "sd15": ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x"],
    "sdxl": ["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.1.model.x"],
    "flux": ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"],
}


def test_every_family_has_a_row() -> None:
    assert set(BASES) == set(FAMILIES)


@pytest.fixture(scope="module", params=sorted(BASES))
def family_pipe(request: pytest.FixtureRequest):
    return request.param, load_base_pipeline(BASES[request.param])


def test_detects_its_pipeline_and_bare_denoiser(family_pipe) -> None:
    name, pipe = family_pipe
    family = get_family(name)
    assert family_of(pipe) is family
    assert family_of(family.denoiser(pipe)) is family
    others = [f for f in FAMILIES.values() if f is not family]
    comps = {c: getattr(pipe, c) for c in ("unet", "transformer", "text_encoder", "text_encoder_2") if hasattr(pipe, c)}
    assert not any(f.matches(comps) for f in others)


@pytest.mark.parametrize("name", sorted(CHECKPOINT_KEYS))
def test_detects_its_checkpoint(name: str) -> None:
    assert family_of_checkpoint(CHECKPOINT_KEYS[name], "x.safetensors").name == name


def test_unknown_checkpoint_names_the_file() -> None:
    with pytest.raises(UserInputError, match="lora.safetensors: not a checkpoint of a known base model"):
        family_of_checkpoint(["lora_unet_x.lora_down.weight"], "lora.safetensors")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_metadata_we_write_reads_back_as_the_family(name: str) -> None:
    family = get_family(name)
    assert family_of_metadata({"modelspec.architecture": f"{family.modelspec_arch}/lora"}) is family
    assert family_of_metadata({"ss_base_model_version": family.ss_base_version}) is family
    assert family_of_metadata({}) is None


def test_every_preset_names_existing_blocks(family_pipe) -> None:
    name, pipe = family_pipe
    family = get_family(name)
    blocks = set(block_names(pipe))
    assert blocks, "the family's block pattern matches no block"
    for preset in [*PRESET_NAMES, *family.presets]:
        if preset in family.refused:
            with pytest.raises(UserInputError, match=re.escape(preset) + ".*not available on"):
                resolve_layers(pipe, preset)
            continue
        selected = resolve_layers(pipe, preset)
        outside = [m for m in selected if not any(m.startswith(b + ".") for b in blocks)]
        assert selected and (not outside or preset == "all"), (preset, outside[:3])  # all: + UNet samplers
    if "craft_content" in family.presets:
        content, style = resolve_layers(pipe, "craft_content"), resolve_layers(pipe, "craft_style")
        assert content and style and not set(content) & set(style)


def test_flux_refuses_blora_by_name_with_the_reason() -> None:
    with pytest.raises(UserInputError, match="blora_content is not available on FLUX.1: .*no FLUX blocks"):
        resolve_layers(load_base_pipeline("flux-tiny"), "blora_content")


def test_flux_attention_preset_covers_both_block_kinds() -> None:
    selected = resolve_layers(load_base_pipeline("flux-tiny"), "attn")
    assert "transformer_blocks.0.attn.add_q_proj" in selected
    assert "single_transformer_blocks.3.attn.to_v" in selected
    assert not any("proj_mlp" in m or ".ff." in m for m in selected)


@pytest.mark.parametrize("name", ["sd15", "sdxl", "flux"])
def test_reference_architecture_is_real_size(name: str) -> None:
    params = {"sd15": 0.86e9, "sdxl": 2.56e9, "flux": 11.9e9}  # denoiser parameters of the released models
    comps = get_family(name).reference_components()
    denoiser = comps[get_family(name).denoiser_component]
    assert all(p.device == torch.device("meta") for p in denoiser.parameters())
    n = sum(p.numel() for p in denoiser.parameters())
    assert abs(n - params[name]) / params[name] < 0.01, n


def test_tiny_bases_come_from_the_families() -> None:
    """A family registers its tiny test bases itself (`tiny_bases`): models/load.py has no list of its own."""
    from lorafuse.models.load import BUILTIN_BASES, TINY_BASES

    registered = {name: family for family in FAMILIES.values() for name in family.tiny_bases}
    assert set(TINY_BASES) == set(registered) and set(registered) <= set(BUILTIN_BASES)
    for name, family in registered.items():
        assert family_of(load_base_pipeline(name)) is family, name


def test_no_module_outside_the_families_branches_on_a_family_name() -> None:
    """`x == "sdxl"`, `arch in ("sd15", "flux")`, `{"sdxl": ...}[arch]`: such code belongs in the family's module.
    The one exception is the SD tiny builder, which builds both UNet architectures by parameter."""
    import ast
    from pathlib import Path

    import lorafuse
    from lorafuse.families import NAMES

    names = set(NAMES) - {"world"}  # "world" is also the built-in base's name, compared as such
    root = Path(lorafuse.__file__).parent
    allowed = {root / "models" / "tiny.py"}
    found = []
    for path in sorted(root.rglob("*.py")):
        if "families" in path.relative_to(root).parts or path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                sides += [e for s in node.comparators if isinstance(s, (ast.Tuple, ast.List, ast.Set)) for e in s.elts]
                if any(isinstance(s, ast.Constant) and s.value in names for s in sides):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found
