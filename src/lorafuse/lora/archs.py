"""Reference architectures: real-size module trees of each family, built on the `meta` device.

No weights and no downloads: each family module (`lorafuse.families`) writes out its published configs, because
nothing may be fetched at run time. They give the exact module names and weight shapes a real LoRA must fit,
for three uses: resolving kohya names in files loaded without a model, guessing which architecture a foreign
LoRA was made for, and checking shapes of real files against the real architecture (the tiny test models have
smaller widths).
"""

from __future__ import annotations

import functools

from torch import nn

from lorafuse.errors import UserInputError
from lorafuse.families import FAMILIES, Family, get_family

# the families with a published real-size architecture (the built-in world has none): foreign LoRAs are
# guessed against these by shapes
REFERENCE_ARCHS = tuple(
    name for name, f in FAMILIES.items() if type(f).reference_components is not Family.reference_components
)
ARCH_LABELS = {name: family.label for name, family in FAMILIES.items()}


@functools.lru_cache(maxsize=4)
def reference_components(arch: str) -> dict[str, nn.Module]:
    """{component: module} of the real-size architecture on the meta device (about 0.3 s, cached)."""
    if arch not in REFERENCE_ARCHS:
        raise UserInputError(f"no reference architecture {arch!r}; known: {', '.join(REFERENCE_ARCHS)}")
    return get_family(arch).reference_components()
