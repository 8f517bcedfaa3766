"""Which UNet modules a trained LoRA gets: layer-set presets per architecture, or the user's own regexes.

`resolve_layers(unet_or_pipe, preset_or_regexes, arch)` returns UNet module paths (no `unet.` prefix), sorted.
A preset is a list of (block, members): the block is a regex over block paths such as
`up_blocks.0.attentions.1`, or the exact path of one block; members is a regex over the module path inside that
block. A preset that names an exact block the base does not have is an error listing the closest block names,
because a LoRA silently trained on fewer layers than asked for shows up only as "it learned nothing".

Presets (the same on every architecture unless the table below says otherwise):
    attn           attention projections to_q, to_k, to_v, to_out.0 of every attn1 / attn2
    default        kohya's LoRA: every Linear / 1x1 conv of every Transformer2DModel (attention, ff, proj_in/out)
    all            kohya's LoCon: default + every ResnetBlock2D (conv1, conv2, conv_shortcut, time_emb_proj)
                   + the down/upsampler convs; 3x3 convs take conv_dim / conv_alpha when set
    blora          B-LoRA as the paper trains it: ONE LoRA on both blocks' attention projections, trained jointly
                   on one image (docs/algorithms.md §4); fusion then takes the content block of one such LoRA and
                   the style block of another
    blora_content  B-LoRA's content block, attention projections only (algorithms.md §4)
    blora_style    B-LoRA's style block, attention projections only
    craft_content  CRAFT-LoRA's content layers I_c: the lower/middle resolutions (algorithms.md §7.3)
    craft_style    CRAFT-LoRA's style layers I_s: the higher resolutions; disjoint from craft_content

B-LoRA blocks (the paper is SDXL-only; the SD1.5 choice is ours):
    sdxl, world    content up_blocks.0.attentions.0, style up_blocks.0.attentions.1 (the paper's blocks; the world
                   UNet has SDXL's block layout, see world/base_model.py)
    sd15           content up_blocks.1.attentions.0, style up_blocks.1.attentions.1: SD1.5's up_blocks.0 has no
                   attention; up_blocks.1 is its first decoder block with attention and runs at 1/4 of the latent
                   size, as SDXL's up_blocks.0 does (16x16 of 64x64 latents vs 32x32 of 128x128).

CRAFT blocks. The paper's table matches neither SD1.5 nor SDXL, so we keep its stated intent with one rule:
attention blocks at the lower half of the attention resolutions (with the mid block) are content; those at the
upper half are style, plus the resnets of the highest resolution (the paper's style set has high-resolution
resnets, and SDXL / the world have no attention at their highest resolution). Attention blocks contribute all
their Linear / 1x1 layers (as `default`), resnets conv1, conv2, conv_shortcut and time_emb_proj.
    sd15   attention at latent/1, /2, /4, /8 -> content /4 and /8: down_blocks.2.attentions.0-1, mid_block,
           up_blocks.1.attentions.0-2; style /1 and /2: down_blocks.0-1.attentions.*, up_blocks.2-3.attentions.*,
           down_blocks.0.resnets.0-1, up_blocks.3.resnets.0-2
    sdxl   attention at latent/2, /4 -> content /4: down_blocks.2.attentions.0-1, mid_block, up_blocks.0.attentions.0-2;
           style /2: down_blocks.1.attentions.0-1, up_blocks.1.attentions.0-2, plus the latent/1 resnets
           down_blocks.0.resnets.0-1, up_blocks.2.resnets.0-2
    world  the SDXL rule with one layer per block: content down_blocks.2.attentions.0, mid_block,
           up_blocks.0.attentions.0-1; style down_blocks.1.attentions.0, up_blocks.1.attentions.0-1,
           down_blocks.0.resnets.0, up_blocks.2.resnets.0-1
User regexes are matched with `re.search` against UNet module paths (`down_blocks.1.attentions.0.proj_in`) and
select Linear and Conv2d modules only.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from lorafuse.errors import UserInputError

ARCHS = ("sd15", "sdxl", "world")
PRESET_NAMES = (
    "default",
    "attn",
    "all",
    "blora",
    "blora_content",
    "blora_style",
    "craft_content",
    "craft_style",
)
# Presets that must never share a module when trained separately and fused later (the joint `blora` preset is
# their union: one LoRA holding both blocks).
DISJOINT_PAIRS = (("blora_content", "blora_style"), ("craft_content", "craft_style"))

# member regexes, relative to a block path
ATTN_PROJ = r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
TRANSFORMER = rf"({ATTN_PROJ}|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)|proj_in|proj_out)"
RESNET = r"(conv1|conv2|conv_shortcut|time_emb_proj)"
SAMPLER = r"conv"

_ATTN_BLOCKS = r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+"
_RESNET_BLOCKS = r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.resnets\.\d+"
_SAMPLER_BLOCKS = r"(down_blocks\.\d+\.downsamplers|up_blocks\.\d+\.upsamplers)\.\d+"
_BLOCK_RE = re.compile(r"^(?:(?:down_blocks|up_blocks)\.\d+|mid_block)\.(?:attentions|resnets)\.\d+$")

Rule = tuple[str, str, bool]  # (block regex or exact block path, member regex, block is an exact name)


def _pattern(block: str, member: str) -> Rule:
    return (block, member, False)


def _blocks(member: str, *names: str) -> list[Rule]:
    return [(name, member, True) for name in names]


def _span(prefix: str, n: int) -> list[str]:
    return [f"{prefix}.{i}" for i in range(n)]


_GENERIC: dict[str, list[Rule]] = {
    "attn": [_pattern(_ATTN_BLOCKS, ATTN_PROJ)],
    "default": [_pattern(_ATTN_BLOCKS, TRANSFORMER)],
    "all": [
        _pattern(_ATTN_BLOCKS, TRANSFORMER),
        _pattern(_RESNET_BLOCKS, RESNET),
        _pattern(_SAMPLER_BLOCKS, SAMPLER),
    ],
}

_NAMED: dict[str, dict[str, list[Rule]]] = {
    "sd15": {
        "blora_content": _blocks(ATTN_PROJ, "up_blocks.1.attentions.0"),
        "blora_style": _blocks(ATTN_PROJ, "up_blocks.1.attentions.1"),
        "craft_content": _blocks(
            TRANSFORMER,
            *_span("down_blocks.2.attentions", 2),
            "mid_block.attentions.0",
            *_span("up_blocks.1.attentions", 3),
        ),
        "craft_style": _blocks(
            TRANSFORMER,
            *_span("down_blocks.0.attentions", 2),
            *_span("down_blocks.1.attentions", 2),
            *_span("up_blocks.2.attentions", 3),
            *_span("up_blocks.3.attentions", 3),
        )
        + _blocks(RESNET, *_span("down_blocks.0.resnets", 2), *_span("up_blocks.3.resnets", 3)),
    },
    "sdxl": {
        "blora_content": _blocks(ATTN_PROJ, "up_blocks.0.attentions.0"),
        "blora_style": _blocks(ATTN_PROJ, "up_blocks.0.attentions.1"),
        "craft_content": _blocks(
            TRANSFORMER,
            *_span("down_blocks.2.attentions", 2),
            "mid_block.attentions.0",
            *_span("up_blocks.0.attentions", 3),
        ),
        "craft_style": _blocks(
            TRANSFORMER, *_span("down_blocks.1.attentions", 2), *_span("up_blocks.1.attentions", 3)
        )
        + _blocks(RESNET, *_span("down_blocks.0.resnets", 2), *_span("up_blocks.2.resnets", 3)),
    },
    "world": {
        "blora_content": _blocks(ATTN_PROJ, "up_blocks.0.attentions.0"),
        "blora_style": _blocks(ATTN_PROJ, "up_blocks.0.attentions.1"),
        "craft_content": _blocks(
            TRANSFORMER,
            "down_blocks.2.attentions.0",
            "mid_block.attentions.0",
            *_span("up_blocks.0.attentions", 2),
        ),
        "craft_style": _blocks(TRANSFORMER, "down_blocks.1.attentions.0", *_span("up_blocks.1.attentions", 2))
        + _blocks(RESNET, "down_blocks.0.resnets.0", *_span("up_blocks.2.resnets", 2)),
    },
}


def preset_rules(preset: str, arch: str) -> list[Rule]:
    """The (block, members, exact) rules of `preset` on `arch`."""
    if arch not in ARCHS:
        raise UserInputError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    if preset == "blora":  # joint B-LoRA training: both blocks in one LoRA
        return preset_rules("blora_content", arch) + preset_rules("blora_style", arch)
    if preset in _GENERIC:
        return _GENERIC[preset]
    if preset in _NAMED[arch]:
        return _NAMED[arch][preset]
    raise UserInputError(
        f"unknown layer preset {preset!r}; choose from {', '.join(PRESET_NAMES)} or give a list of regexes"
    )


def _unet(unet_or_pipe: object):
    from torch import nn

    unet = getattr(unet_or_pipe, "unet", unet_or_pipe)
    if not isinstance(unet, nn.Module) or not hasattr(unet, "down_blocks"):
        raise UserInputError(f"expected a diffusers pipeline or UNet, got {type(unet_or_pipe).__name__}")
    return unet


def detect_arch(unet_or_pipe: object) -> str:
    """ "sd15" | "sdxl" | "world" from the UNet's block layout (what presets and kohya names depend on).

    SDXL: a second text encoder or the "text_time" size conditioning. world: SDXL's block layout (no attention in
    the first down block) without it. sd15: attention in the first down block (SD1.x and SD2.x).
    """
    unet = _unet(unet_or_pipe)
    config = unet.config
    if getattr(unet_or_pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    down = tuple(config.get("down_block_types", ()))
    if down == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"):
        return "world"
    if down[:1] == ("CrossAttnDownBlock2D",):
        return "sd15"
    raise UserInputError(
        f"cannot tell the architecture of a UNet with down blocks {list(down)}: lorafuse knows SD1.5 "
        "(CrossAttnDownBlock2D first), SDXL (text_time conditioning) and its built-in world model"
    )


def block_names(unet_or_pipe: object) -> list[str]:
    """Every attention / resnet block path of the UNet, e.g. `up_blocks.0.attentions.1`."""
    return [name for name, _ in _unet(unet_or_pipe).named_modules() if _BLOCK_RE.match(name)]


def _lora_able(unet) -> list[str]:
    from torch import nn

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
    unet = _unet(unet_or_pipe)
    modules = _lora_able(unet)
    if isinstance(preset_or_regexes, str):
        arch = arch or detect_arch(unet_or_pipe)
        rules = preset_rules(preset_or_regexes, arch)
        existing = set(block_names(unet))
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
