"""The registered families, and detection: which family a pipeline, checkpoint or LoRA file belongs to."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from torch import nn

from lorafuse.errors import UserInputError
from lorafuse.families import flux, sd15, sdxl, world
from lorafuse.families.base import Family

# One line per family. Detection asks each in turn; their `matches` are mutually exclusive.
FAMILIES: dict[str, Family] = {f.name: f for f in (sd15.FAMILY, sdxl.FAMILY, world.FAMILY, flux.FAMILY)}
NAMES = tuple(FAMILIES)
# What pipeline attributes can hold a LoRA-able component, in the order LoRA files list them.
COMPONENT_NAMES = tuple(dict.fromkeys(c for f in FAMILIES.values() for c in f.components))


def get_family(name: str | Family) -> Family:
    """The family called `name` ("sd15", "sdxl", "world", ...); a `Family` passes through."""
    if isinstance(name, Family):
        return name
    if name not in FAMILIES:
        raise UserInputError(f"unknown base-model family {name!r}; known: {', '.join(NAMES)}")
    return FAMILIES[name]


def components(base: Any) -> dict[str, nn.Module]:
    """{attribute: module} of a pipeline, a {name: module} mapping, or a bare denoiser (named by its family)."""
    if isinstance(base, Mapping):
        return {k: v for k, v in base.items() if isinstance(v, nn.Module)}
    if isinstance(base, nn.Module) and not any(hasattr(base, c) for c in COMPONENT_NAMES):
        for family in FAMILIES.values():
            if family.matches({family.denoiser_component: base}):
                return {family.denoiser_component: base}
        return {}
    return {c: getattr(base, c) for c in COMPONENT_NAMES if isinstance(getattr(base, c, None), nn.Module)}


def family_of(base: Any) -> Family:
    """The family of a pipeline, a {component: module} mapping or a bare denoiser (UNet or transformer)."""
    comps = components(base)
    for family in FAMILIES.values():
        if family.matches(comps):
            return family
    layout = ""
    config = getattr(comps.get("unet", base), "config", None)
    if config is not None and "down_block_types" in config:
        layout = f" (a UNet with down blocks {list(config.get('down_block_types', ()))})"
    raise UserInputError(
        f"cannot tell which base-model family {type(base).__name__}{layout} is; lorafuse knows "
        + ", ".join(f.label for f in FAMILIES.values())
    )


def family_of_checkpoint(keys: Collection[str], source: str) -> Family:
    """The family of a single-file checkpoint from its tensor names."""
    for family in FAMILIES.values():
        if family.matches_checkpoint(keys):
            return family
    raise UserInputError(
        f"{source}: not a checkpoint of a known base model ({', '.join(f.label for f in FAMILIES.values())}); "
        "is it a LoRA?"
    )


def family_of_metadata(metadata: Mapping[str, str]) -> Family | None:
    """The family a LoRA file's `modelspec.architecture` or `ss_base_model_version` names; None if neither."""
    spec = metadata.get("modelspec.architecture", "").split("/")[0]
    version = metadata.get("ss_base_model_version", "")
    for family in FAMILIES.values():
        if spec == family.modelspec_arch or version == family.ss_base_version:
            return family
    for family in FAMILIES.values():  # kohya writes variants such as "sdxl_base_v0-9", "sd_v1_v"
        if version and version.startswith(family.ss_base_version.split("_")[0] + "_"):
            return family
    return None


def family_of_lora_keys(keys: Collection[str]) -> Family | None:
    """The family whose module names only it has appear in these LoRA keys; None when names alone cannot tell."""
    found = [f for f in FAMILIES.values() if f.matches_lora_keys(keys)]
    return found[0] if len(found) == 1 else None
