"""Base-model families: one object per family (SD1.5, SDXL, the built-in world, ...) owning everything that
differs between bases. See `families/base.py` for what a family owns and how to add one.

This package is the lowest layer above `errors`: it imports only torch, diffusers and transformers, so every
other package (lora, models, guidance, train, fusion, ...) may ask it about the base at hand.
"""

from lorafuse.families.base import Family
from lorafuse.families.clip import CLIP_SKIP_CONVENTIONS, resolve_clip_skip
from lorafuse.families.conditioning import Conditioning, GuidanceCond
from lorafuse.families.registry import (
    COMPONENT_NAMES,
    FAMILIES,
    NAMES,
    components,
    family_of,
    family_of_checkpoint,
    family_of_lora_keys,
    family_of_metadata,
    get_family,
)

__all__ = [
    "CLIP_SKIP_CONVENTIONS",
    "COMPONENT_NAMES",
    "FAMILIES",
    "NAMES",
    "Conditioning",
    "Family",
    "GuidanceCond",
    "components",
    "family_of",
    "family_of_checkpoint",
    "family_of_lora_keys",
    "family_of_metadata",
    "get_family",
    "resolve_clip_skip",
]
