"""The LoRA-able modules of a base model, by canonical key: what validation and injection match against."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from lorafuse.errors import UserInputError
from lorafuse.families import components, get_family
from lorafuse.lora.keys import KeyIndex, UnetLayout, canonical_key

_TARGET_TYPES = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class ModuleRef:
    """Where a LoRA key lands: `components[component].get_submodule(path)`, whose weight has `shape`."""

    component: str
    path: str
    shape: tuple[int, ...]


@dataclass
class BaseModules:
    """Every Linear / Conv2d of a base model, keyed canonically (text encoders with `text_model.`)."""

    modules: dict[str, ModuleRef]
    layout: UnetLayout | None = None
    index: KeyIndex = field(init=False)

    def __post_init__(self) -> None:
        self.index = KeyIndex(self.modules, self.layout)

    def resolve(self, key: str) -> ModuleRef | None:
        """A LoRA key (canonical, or a guess from a flattened name) -> the module it targets, or None."""
        found = self.index.resolve(key)
        return None if found is None else self.modules[found]

    def components(self) -> set[str]:
        return {ref.component for ref in self.modules.values()}


def _lora_targets(component: str, root: nn.Module) -> dict[str, ModuleRef]:
    out: dict[str, ModuleRef] = {}
    for name, module in root.named_modules():
        parts = name.split(".")
        # Already-injected peft layers: the wrapper keeps the original name; skip its inner pieces.
        if "base_layer" in parts or any(p.startswith("lora_") for p in parts):
            continue
        base = getattr(module, "base_layer", None)
        target = base if isinstance(base, _TARGET_TYPES) else module
        if isinstance(target, _TARGET_TYPES) and name:
            out[canonical_key(component, name)] = ModuleRef(component, name, tuple(target.weight.shape))
    return out


def components_of(base: object) -> dict[str, nn.Module]:
    """A pipeline (attributes unet or transformer, text_encoder, text_encoder_2), a {component: module} mapping,
    or a bare denoiser (a UNet of an unknown layout counts as "unet")."""
    comps = components(base)
    if not comps and isinstance(base, nn.Module) and not isinstance(base, Mapping):
        comps = {"unet": base}
    if not comps:
        raise UserInputError(
            f"cannot find LoRA-able components in {type(base).__name__}: pass a diffusers pipeline, "
            "a {'unet': ..., 'text_encoder': ...} mapping, a UNet or a transformer"
        )
    return comps


def base_modules(base: object) -> BaseModules:
    """BaseModules of a pipeline / mapping / UNet (or pass a BaseModules through)."""
    if isinstance(base, BaseModules):
        return base
    comps = components_of(base)
    modules: dict[str, ModuleRef] = {}
    for component, root in comps.items():
        modules.update(_lora_targets(component, root))
    layout = None
    unet = comps.get("unet")
    config = getattr(unet, "config", None)
    if config is not None and "layers_per_block" in config and "up_block_types" in config:
        layout = UnetLayout.from_config(config)
    return BaseModules(modules, layout)


@functools.lru_cache(maxsize=4)
def reference_modules(arch: str) -> BaseModules:
    """BaseModules of the real-size architecture (meta device, no weights)."""
    from lorafuse.lora.archs import REFERENCE_ARCHS

    if arch not in REFERENCE_ARCHS:
        raise UserInputError(f"no reference architecture {arch!r}; known: {', '.join(REFERENCE_ARCHS)}")
    built, written = get_family(arch).reference_lora_targets()
    base = base_modules(built)
    modules = dict(base.modules)
    for key, shape in written.items():
        component, path = key.split(".", 1)
        modules[key] = ModuleRef(component, path, shape)
    return BaseModules(modules, base.layout)
