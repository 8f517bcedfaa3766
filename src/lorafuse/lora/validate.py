"""Does a LoRA fit a base model? Checked before any work, because a LoRA that matches nothing otherwise shows
up only as "no effect" (ComfyUI applies a wrong-architecture LoRA partly, with a console warning at most).

- no key matches a module of the base: `LoraFormatError` naming the file, the count and what the keys look like;
- some keys match nothing: `LoraCoverageWarning` with counts and example keys (also in `report.warnings`);
- a matching key whose ΔW has the wrong shape: `LoraFormatError` naming key, expected and found shapes;
- an update far larger than the base weight it changes: a warning, or past a clear limit an error (checks.py).
Use `report.targets[key]` to find the module a LoRA key applies to: kohya names are resolved against this base's
own module names, which is exact even where a key's canonical spelling came from another UNet layout.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from lorafuse.errors import LoraFormatError, UserInputError
from lorafuse.families import FAMILIES
from lorafuse.lora.archs import ARCH_LABELS, REFERENCE_ARCHS
from lorafuse.lora.checks import check_against_base
from lorafuse.lora.keys import ARCHS, split_key, split_kohya_prefix
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import BaseModules, ModuleRef, base_modules, components_of, reference_modules

N_EXAMPLES = 3


class LoraCoverageWarning(UserWarning):
    """Part of a LoRA matches no module of the base."""


@dataclass(frozen=True)
class ShapeMismatch:
    key: str
    expected: tuple[int, ...]  # the base weight's shape
    found: tuple[int, ...]  # the shape of the LoRA's ΔW

    def __str__(self) -> str:
        return f"{self.key}: base weight {self.expected}, LoRA ΔW {self.found}"


@dataclass
class CoverageReport:
    arch: str
    source: str
    total: int
    targets: dict[str, ModuleRef] = field(default_factory=dict)  # LoRA key -> base module
    unmatched: list[str] = field(default_factory=list)
    shape_mismatches: list[ShapeMismatch] = field(default_factory=list)
    looks_like: str | None = None  # reference architecture the unmatched keys fit, if any
    warnings: list[str] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return len(self.targets)

    @property
    def coverage(self) -> float:
        return self.matched / self.total if self.total else 0.0


def delta_shape(module: LoraModule) -> tuple[int, ...]:
    if module.delta is not None:
        return tuple(module.delta.shape)
    assert module.down is not None and module.up is not None
    return (int(module.up.shape[0]), *(int(d) for d in module.down.shape[1:]))


def fits(module: LoraModule, weight_shape: tuple[int, ...]) -> bool:
    """ΔW fits the weight exactly, or up to layouts that hold the same numbers (2-D LoRA on a 1x1 conv,
    1x1-conv LoRA on a linear, LoHa conv kept flattened): equal out-features and equal element count."""
    found = delta_shape(module)
    if found == tuple(weight_shape):
        return True
    same_numbers = found[0] == weight_shape[0] and math.prod(found) == math.prod(weight_shape)
    if module.delta is not None:
        return same_numbers
    # a low-rank update may only change layout where the kernel is 1x1 on either side
    return same_numbers and math.prod(found[2:]) == 1 and math.prod(weight_shape[2:]) == 1


def _resolve(state: LoraState, key: str, base: BaseModules) -> ModuleRef | None:
    name = state.source_names.get(key)
    if name is not None:
        try:
            component, rest = split_kohya_prefix(name)
        except LoraFormatError:
            component = None
        if component is not None:
            hit = base.index.lookup_flat(component, rest)
            if hit is not None:
                return base.modules[hit]
    return base.resolve(key)


def _shown(state: LoraState, key: str) -> str:
    return state.source_names.get(key, key)


def _guess_arch(state: LoraState, keys: list[str], exclude: str) -> str | None:
    """The reference architecture in which at least half of `keys` exist with fitting shapes; failing that
    (a LoRA for a scaled-down model, like our tiny test ones), in which at least half exist by name."""
    for use_shapes in (True, False):
        best, best_n = None, 0
        for arch in REFERENCE_ARCHS:
            ref = reference_modules(arch)
            n = 0
            for key in keys:
                target = _resolve(state, key, ref)
                n += target is not None and (not use_shapes or fits(state.modules[key], target.shape))
            if n > best_n:
                best, best_n = arch, n
        if best is not None and best_n * 2 >= len(keys):
            return None if best == exclude else best
    return None


def _describe_keys(state: LoraState, keys: list[str]) -> str:
    return ", ".join(repr(_shown(state, k)) for k in keys[:N_EXAMPLES])


_DENOISERS = ("unet", "transformer")


def _check_family(state: LoraState, base: BaseModules, label: str, source: str) -> None:
    """A UNet LoRA on a transformer base (or the reverse) cannot fit anywhere: say so by family, first."""
    lora_side = {split_key(k)[0] for k in state.modules} & set(_DENOISERS)
    base_side = base.components() & set(_DENOISERS)
    if not lora_side or not base_side or lora_side & base_side:
        return
    keys = sorted(k for k in state.modules if split_key(k)[0] in lora_side)
    transformer_families = [f.label for f in FAMILIES.values() if f.denoiser_component in lora_side - {"unet"}]
    if transformer_families:
        family = transformer_families[0]
    else:
        guess = _guess_arch(state, keys, exclude="")
        family = ARCH_LABELS[guess] if guess else "Stable Diffusion (UNet)"
    raise LoraFormatError(
        f"{source}: this is a {family} LoRA and the base is {label}: its {len(keys)} {lora_side.pop()} keys "
        f"(e.g. {_describe_keys(state, keys)}) have no counterpart in a {label} model. A LoRA applies only to the "
        f"model family it was trained on; use a {label} LoRA, or a {family} base."
    )


def validate_lora(
    state: LoraState, pipeline_or_modules: object, *, arch: str, check_shapes: bool = True
) -> CoverageReport:
    """Check key coverage (and shapes) of `state` against a base before any work. See the module docstring.

    pipeline_or_modules: a diffusers pipeline, a {component: module} mapping, a UNet, or `BaseModules`.
    arch: "sd15" | "sdxl" | "world" | "flux", the base's architecture (for messages and the wrong-arch diagnosis).
    check_shapes=False checks names only (e.g. a real LoRA against a tiny test model with smaller widths).
    """
    if arch not in ARCHS:
        raise UserInputError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    base = base_modules(pipeline_or_modules)
    source = state.source_path or "LoRA"
    label = ARCH_LABELS.get(arch, arch)
    report = CoverageReport(arch=arch, source=source, total=len(state.modules))
    if not state.modules:
        raise LoraFormatError(f"{source}: the LoRA has no modules")
    _check_family(state, base, label, source)

    for key in sorted(state.modules):
        target = _resolve(state, key, base)
        if target is None:
            report.unmatched.append(key)
        else:
            report.targets[key] = target
            if check_shapes and not fits(state.modules[key], target.shape):
                report.shape_mismatches.append(
                    ShapeMismatch(key, target.shape, delta_shape(state.modules[key]))
                )

    suspicious = report.unmatched + [m.key for m in report.shape_mismatches]
    if suspicious:
        guess = _guess_arch(state, suspicious, exclude=arch)
        report.looks_like = guess
    looks = f" (they look like {ARCH_LABELS[report.looks_like]} keys)" if report.looks_like else ""

    if not report.targets:
        missing = sorted({split_key(k)[0] for k in state.modules} - base.components())
        absent = f"; the base has no {', '.join(missing)}" if missing else ""
        raise LoraFormatError(
            f"{source}: {report.total} of {report.total} LoRA keys match no module of this {label} base{looks}"
            f"{absent}. The keys look like: {_describe_keys(state, report.unmatched)}. Use a LoRA made for "
            f"{label}, or load the base model this LoRA was trained on."
        )
    if report.shape_mismatches:
        first = "; ".join(str(m) for m in report.shape_mismatches[:N_EXAMPLES])
        raise LoraFormatError(
            f"{source}: {len(report.shape_mismatches)} of {report.total} LoRA keys do not fit the weight shapes "
            f"of this {label} base{looks}: {first}. A LoRA only applies to the architecture it was trained on."
        )
    if report.unmatched:
        message = (
            f"{source}: {len(report.unmatched)} of {report.total} LoRA keys match no module of this {label} "
            f"base{looks} and cannot be applied, e.g. {_describe_keys(state, report.unmatched)}; "
            f"{report.matched} keys match."
        )
        report.warnings.append(message)
        warnings.warn(message, LoraCoverageWarning, stacklevel=2)
    if check_shapes:
        report.warnings += check_against_base(state, _target_weights(pipeline_or_modules, report.targets))
    return report


def _target_weights(base: object, targets: dict[str, ModuleRef]) -> dict[str, torch.Tensor]:
    """{LoRA key: the base weight it changes}, or {} for a base known only by names and shapes."""
    if isinstance(base, BaseModules):
        return {}
    comps = components_of(base)
    out = {}
    for key, ref in targets.items():
        module = comps[ref.component].get_submodule(ref.path)
        module = getattr(module, "base_layer", module)  # an already-injected peft layer
        out[key] = module.weight
    return out
