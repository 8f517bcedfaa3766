"""Layer-set rules: how a family names the blocks of its denoiser that a preset selects.

A rule is (block, members, exact): `block` is a regex over block paths such as `up_blocks.0.attentions.1`, or the
exact path of one block; `members` is a regex over the module path inside that block. `lora.presets` applies
the rules to a live model; each family module holds its own table of named presets.
"""

from __future__ import annotations

Rule = tuple[str, str, bool]  # (block regex or exact block path, member regex, block is an exact name)

# UNet member regexes, relative to a block path
ATTN_PROJ = r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
TRANSFORMER = rf"({ATTN_PROJ}|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)|proj_in|proj_out)"
RESNET = r"(conv1|conv2|conv_shortcut|time_emb_proj)"
SAMPLER = r"conv"

UNET_ATTN_BLOCKS = r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+"
UNET_RESNET_BLOCKS = r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.resnets\.\d+"
UNET_SAMPLER_BLOCKS = r"(down_blocks\.\d+\.downsamplers|up_blocks\.\d+\.upsamplers)\.\d+"
UNET_BLOCK = r"^(?:(?:down_blocks|up_blocks)\.\d+|mid_block)\.(?:attentions|resnets)\.\d+$"


def pattern(block: str, member: str) -> Rule:
    return (block, member, False)


def blocks(member: str, *names: str) -> list[Rule]:
    return [(name, member, True) for name in names]


def span(prefix: str, n: int, start: int = 0) -> list[str]:
    return [f"{prefix}.{i}" for i in range(start, start + n)]


# The presets every UNet family shares (kohya's LoRA / LoCon targets).
UNET_GENERIC: dict[str, list[Rule]] = {
    "attn": [pattern(UNET_ATTN_BLOCKS, ATTN_PROJ)],
    "default": [pattern(UNET_ATTN_BLOCKS, TRANSFORMER)],
    "all": [
        pattern(UNET_ATTN_BLOCKS, TRANSFORMER),
        pattern(UNET_RESNET_BLOCKS, RESNET),
        pattern(UNET_SAMPLER_BLOCKS, SAMPLER),
    ],
}
