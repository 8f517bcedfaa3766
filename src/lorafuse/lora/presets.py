"""Which UNet modules a trained LoRA gets: layer-set presets per architecture, or the user's own regexes.

`resolve_layers(unet_or_pipe, preset_or_regexes, arch)` returns UNet module paths (no `unet.` prefix), sorted.
A preset is a list of (block, members): the block is a regex over block paths such as
`up_blocks.0.attentions.1`, or the exact path of one block; members is a regex over the module path inside that
block. A preset that names an exact block the base does not have is an error listing the closest block names,
because a LoRA silently trained on fewer layers than asked for shows up only as "it learned nothing".

Presets (named per family in `lorafuse.families`; the generic ones mean the same on every UNet family):
    attn           attention projections to_q, to_k, to_v, to_out.0 of every attn1 / attn2
    default        kohya's LoRA: every Linear / 1x1 conv of every Transformer2DModel (attention, ff, proj_in/out)
    all            kohya's LoCon: default + every ResnetBlock2D (conv1, conv2, conv_shortcut, time_emb_proj)
                   + the down/upsampler convs; 3x3 convs take conv_dim / conv_alpha when set
    blora          B-LoRA as the paper trains it: ONE LoRA on both blocks' attention projections, trained jointly
                   (docs/algorithms.md §4); fusion then takes the content block of one such LoRA and the
                   style block of another
    blora_content  B-LoRA's content block, attention projections only (docs/algorithms.md §4)
    blora_style    B-LoRA's style block, attention projections only
    craft_content  CRAFT-LoRA's content layers I_c: the lower/middle resolutions (docs/algorithms.md §7.3)
    craft_style    CRAFT-LoRA's style layers I_s: the higher resolutions; disjoint from craft_content
Each family module (families/sd15.py, sdxl.py, world.py, ...) gives its blocks and why.
User regexes are matched with `re.search` against UNet module paths (`down_blocks.1.attentions.0.proj_in`) and
select Linear and Conv2d modules only.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from torch import nn

from lorafuse.errors import UserInputError
from lorafuse.families import FAMILIES, NAMES, Family, components, family_of, get_family
from lorafuse.families.layers import ATTN_PROJ, RESNET, SAMPLER, TRANSFORMER, Rule

__all__ = ["ATTN_PROJ", "RESNET", "SAMPLER", "TRANSFORMER", "block_names", "detect_arch", "preset_rules",
           "resolve_layers"]  # fmt: skip

ARCHS = NAMES
PRESET_NAMES = (  # every family has these (or refuses them by name); FAMILY_PRESET_NAMES adds the others
    "default",
    "attn",
    "all",
    "blora",
    "blora_content",
    "blora_style",
    "craft_content",
    "craft_style",
)
FAMILY_PRESET_NAMES = tuple(dict.fromkeys([*PRESET_NAMES, *(p for f in FAMILIES.values() for p in f.presets)]))
# Presets that must never share a module when trained separately and fused later (the joint `blora` preset is
# their union: one LoRA holding both blocks).
DISJOINT_PAIRS = (("blora_content", "blora_style"), ("craft_content", "craft_style"))


def preset_rules(preset: str, arch: str | Family, denoiser: nn.Module | None = None) -> list[Rule]:
    """The (block, members, exact) rules of `preset` on family `arch` (for `denoiser`'s depth, if given)."""
    family = get_family(arch)
    family.check_refused(preset)
    if preset == "blora":  # joint B-LoRA training: both blocks in one LoRA
        return preset_rules("blora_content", family, denoiser) + preset_rules("blora_style", family, denoiser)
    if preset in family.presets:
        return family.rules(preset, denoiser)
    names = [*PRESET_NAMES, *(p for p in family.presets if p not in PRESET_NAMES)]
    raise UserInputError(f"unknown layer preset {preset!r}; choose from {', '.join(names)} or give a list of regexes")


def _denoiser(base: object) -> tuple[nn.Module, Family]:
    """(denoiser, family) of a pipeline, a component mapping or a bare UNet / transformer."""
    family = family_of(base)
    return components(base)[family.denoiser_component], family


def detect_arch(unet_or_pipe: object) -> str:
    """The family name ("sd15", "sdxl", "world", ...) of a pipeline or denoiser; see `families.family_of`."""
    return _denoiser(unet_or_pipe)[1].name


def block_names(unet_or_pipe: object) -> list[str]:
    """Every block path presets can name, e.g. `up_blocks.0.attentions.1`."""
    module, family = _denoiser(unet_or_pipe)
    block_re = re.compile(family.block_pattern)
    return [name for name, _ in module.named_modules() if block_re.match(name)]


def _lora_able(unet) -> list[str]:
    out = []
    for name, module in unet.named_modules():
        parts = name.split(".")
        if "base_layer" in parts or any(p.startswith("lora_") for p in parts):
            continue  # inside a peft wrapper: the wrapper itself carries the original name
        target = getattr(module, "base_layer", module)
        if isinstance(target, (nn.Linear, nn.Conv2d)) and name:
            out.append(name)
    return out


def _missing_block_error(name: str, preset: str, arch: str, blocks: Sequence[str]) -> UserInputError:
    close = difflib.get_close_matches(name, blocks, n=4, cutoff=0.5)
    hint = f"; closest blocks of this base: {', '.join(close)}" if close else ""
    return UserInputError(
        f"layer preset {preset!r} for {arch} names block {name!r}, which this UNet does not have{hint}. "
        "Is the architecture right? Otherwise give network.layers as a list of regexes."
    )


def resolve_layers(
    unet_or_pipe: object, preset_or_regexes: str | Sequence[str], arch: str | None = None
) -> list[str]:
    """Sorted UNet module paths (Linear / Conv2d) selected by a preset name or by regexes (`re.search`).

    arch: "sd15" | "sdxl" | "world"; None detects it from the UNet. Errors: an unknown preset, a preset block the
    UNet lacks (naming the closest blocks), or a selection that matches no module.
    """
    unet, family = _denoiser(unet_or_pipe)
    modules = _lora_able(unet)
    if isinstance(preset_or_regexes, str):
        arch = arch or family.name
        rules = preset_rules(preset_or_regexes, arch, unet)
        existing = set(block_names(unet_or_pipe))
        selected: set[str] = set()
        for block, member, exact in rules:
            if exact and block not in existing:
                raise _missing_block_error(block, preset_or_regexes, arch, sorted(existing))
            block_re = re.escape(block) if exact else block
            pattern = re.compile(rf"^{block_re}\.{member}$")
            selected.update(m for m in modules if pattern.match(m))
        what = f"layer preset {preset_or_regexes!r} ({arch})"
    else:
        patterns = [re.compile(p) for p in preset_or_regexes]
        selected = {m for m in modules if any(p.search(m) for p in patterns)}
        what = f"layers {list(preset_or_regexes)}"
    if not selected:
        examples = ", ".join(modules[:: max(len(modules) // 4, 1)][:4])
        raise UserInputError(
            f"{what} selects no Linear / Conv2d module of this UNet; module names look like {examples}"
        )
    return sorted(selected)
