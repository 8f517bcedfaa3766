"""LoRA adapters in a live pipeline: peft LoRA layers, injected from a `LoraState`, managed by name.

Layers are peft's (`peft.tuners.lora.Linear` / `Conv2d` wrap the base module; nothing patches `forward`).
`inject_lora` builds one `peft.LoraConfig` per component with per-module ranks and alphas (`rank_pattern` /
`alpha_pattern`), targets exactly the modules `validate_lora` resolved (linear and conv: LoCon on resnet convs,
1x1 `proj_in`), and copies the factors in unchanged, so the adapter computes s · B (A x) with the file's own B,
A and s = alpha / r. Dense modules (LyCORIS LoHa / LoKr, rebuilt as ΔW) are injected as an exact-rank SVD
factorisation (`resize.factorize`), not added to the weights: they stay switchable, weightable and
per-sample like any other adapter; exact up to float32 rounding of the SVD.

Adapter state lives in the layers, keyed by adapter name (peft's design): weight = scaling · r / alpha,
enabled = in the layer's active list (every layer gets the same list), merged = in `merged_adapters`.
Functions here keep that state consistent across all layers of all components.

Text encoders: a canonical key keeps the `text_model.` level (state.py) but a transformers-5 `CLIPTextModel`
has none; `validate_lora` resolves every key to the real module path (`report.targets`), and only that is used.

Merging: `merge_adapters` adds every enabled adapter's ΔW to the base weights, checking for NaN/inf and naming
the adapter that produced them; `unmerge_adapters` restores the exact pre-merge weights from a kept copy.
Weights: use `set_adapter_weights`, not diffusers' `cross_attention_kwargs={"scale": s}`: diffusers rescales
every layer with it and, for s = 0, resets every active adapter's weight to 1.
Per-sample adapters: `per_sample_adapters(unet, ["a", "__base__"])` runs sample 0 with adapter a and sample 1 on
the base in one batched forward (peft's mixed-batch path): the building block for giving the conditional and
unconditional halves of a CFG batch different adapters.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from lorafuse.errors import LoraFormatError, LorafuseError, UserInputError
from lorafuse.families import family_of
from lorafuse.lora.resize import factorize
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import components_of
from lorafuse.lora.validate import CoverageReport, validate_lora

BASE = "__base__"  # peft's name for "no adapter" in per-sample lists
_MERGE_ORIGINAL = "_lorafuse_merge_original"  # the pre-merge weight tensor, kept on the peft layer


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    modules: int
    components: tuple[str, ...]
    weight: float
    enabled: bool
    merged: bool


def pipeline_arch(pipe: object) -> str:
    """The family name ("sd15", "sdxl", "world", ...) of a pipeline, mapping or denoiser; see `families.family_of`."""
    return family_of(pipe).name


def _layers(pipe: object) -> list[tuple[str, str, LoraLayer]]:
    """(component, module path, peft layer) for every LoRA layer."""
    out = []
    for component, root in components_of(pipe).items():
        for path, module in root.named_modules():
            if isinstance(module, LoraLayer):
                out.append((component, path, module))
    return out


def adapter_names(pipe: object) -> list[str]:
    """Every adapter present, in order of injection."""
    names: dict[str, None] = {}
    for _, _, layer in _layers(pipe):
        names.update(dict.fromkeys(layer.lora_A.keys()))
    return list(names)


def enabled_adapters(pipe: object) -> list[str]:
    present = set(adapter_names(pipe))
    names: dict[str, None] = {}
    for _, _, layer in _layers(pipe):
        names.update(dict.fromkeys(n for n in layer.active_adapters if n in present))
    return list(names)


def adapter_info(pipe: object) -> dict[str, AdapterInfo]:
    """Per adapter: how many modules, which components, its weight, enabled, merged."""
    enabled = set(enabled_adapters(pipe))
    count: Counter[str] = Counter()
    comps: dict[str, set[str]] = {}
    weight: dict[str, float] = {}
    merged: set[str] = set()
    for component, _, layer in _layers(pipe):
        for name in layer.lora_A.keys():
            count[name] += 1
            comps.setdefault(name, set()).add(component)
            alpha = layer.lora_alpha[name]
            weight.setdefault(name, layer.scaling[name] * layer.r[name] / alpha if alpha else 0.0)
        merged.update(layer.merged_adapters)
    return {
        name: AdapterInfo(
            name, count[name], tuple(sorted(comps[name])), weight[name], name in enabled, name in merged
        )
        for name in adapter_names(pipe)
    }


def _set_active(pipe: object, names: Sequence[str]) -> None:
    # The same list on every layer: peft skips names a layer does not hold, so "enabled" is one global list.
    for _, _, layer in _layers(pipe):
        if layer.disable_adapters:
            layer.enable_adapters(True)
        layer.set_adapter(list(names), inference_mode=True)  # inference: adapter weights need no grad


def _require_known(pipe: object, names: Iterable[str]) -> None:
    present = adapter_names(pipe)
    unknown = [n for n in names if n not in present]
    if unknown:
        have = ", ".join(repr(n) for n in present) or "none"
        raise UserInputError(f"unknown adapter(s) {', '.join(repr(n) for n in unknown)}; present: {have}")


def _require_unmerged(pipe: object, action: str) -> None:
    if any(layer.merged for _, _, layer in _layers(pipe)):
        raise UserInputError(
            f"adapters are merged into the base weights; call unmerge_adapters before you {action}"
        )


def _exact_regex(paths: Iterable[str]) -> str:
    # peft full-matches a string target_modules: exact module paths, never a suffix of another module's path
    return "(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")"


def _config(modules: Mapping[str, LoraModule]) -> LoraConfig:
    ranks = {path: m.rank for path, m in modules.items()}
    alphas = {path: float(m.alpha) if m.alpha is not None else float(m.rank) for path, m in modules.items()}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    return LoraConfig(
        r=r0,
        lora_alpha=a0,
        target_modules=_exact_regex(modules),
        # peft matches pattern keys as regexes ending the module path; escaped full paths match exactly one
        rank_pattern={re.escape(p): r for p, r in ranks.items() if r != r0},
        alpha_pattern={re.escape(p): a for p, a in alphas.items() if a != a0},
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,  # the factors are overwritten right after
    )


def _load_factors(layer: LoraLayer, name: str, module: LoraModule, where: str) -> None:
    with torch.no_grad():
        for param, tensor, role in (
            (layer.lora_A[name].weight, module.down, "down"),
            (layer.lora_B[name].weight, module.up, "up"),
        ):
            assert tensor is not None
            if tensor.numel() != param.numel():
                raise LoraFormatError(
                    f"{where}: LoRA {role} has shape {tuple(tensor.shape)}, the layer needs {tuple(param.shape)}"
                )
            param.copy_(tensor.reshape(param.shape))


def inject_lora(
    pipe: object, state: LoraState, adapter_name: str, weight: float = 1.0, *, arch: str | None = None
) -> CoverageReport:
    """Add `state` to `pipe` as the peft adapter `adapter_name` at `weight`, enabled; return the coverage report.

    pipe: a diffusers pipeline, a {component: module} mapping or a UNet. Keys are validated first: none
    matching is an error, some unmatched a `LoraCoverageWarning`; only matched modules are injected.
    """
    if not adapter_name or "." in adapter_name or adapter_name == BASE:
        raise UserInputError(f"invalid adapter name {adapter_name!r}: non-empty, no '.', not {BASE!r}")
    if adapter_name in adapter_names(pipe):
        raise UserInputError(
            f"adapter {adapter_name!r} already exists; delete_adapter it first or pick another name"
        )
    _require_unmerged(pipe, "inject another adapter")
    report = validate_lora(state, pipe, arch=arch or pipeline_arch(pipe))
    enabled = enabled_adapters(pipe)
    comps = components_of(pipe)

    plan: dict[str, dict[str, LoraModule]] = {}
    for key, ref in sorted(report.targets.items()):
        module = state.modules[key]
        for t in (module.down, module.up, module.delta):
            if t is not None and not torch.isfinite(t).all():
                raise LoraFormatError(
                    f"adapter {adapter_name!r}: {key} has non-finite values (NaN/inf); not injecting it"
                )
        if module.down is None:
            module = factorize(module.delta_weight(ref.shape))
        plan.setdefault(ref.component, {})[ref.path] = module

    try:
        for component, modules in plan.items():
            root = comps[component]
            with warnings.catch_warnings():
                # several adapters per model is what we want; peft warns about it on every second injection
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(_config(modules), root, adapter_name=adapter_name)
            for path, module in modules.items():
                layer = root.get_submodule(path)
                _load_factors(layer, adapter_name, module, f"{component}.{path}")
                layer.set_scale(adapter_name, weight)
    except BaseException:
        if adapter_name in adapter_names(pipe):
            delete_adapter(pipe, adapter_name)
        _set_active(pipe, enabled)
        raise
    _set_active(pipe, [*enabled, adapter_name])
    return report


def set_adapter_weights(pipe: object, weights: Mapping[str, float]) -> None:
    """Set each named adapter's weight (ΔW is scaled linearly; 0 means the base output exactly)."""
    _require_known(pipe, weights)
    _require_unmerged(pipe, "change adapter weights")
    bad = {n: w for n, w in weights.items() if not math.isfinite(w)}
    if bad:
        raise UserInputError(f"adapter weights must be finite numbers, got {bad}")
    for _, _, layer in _layers(pipe):
        for name, w in weights.items():
            layer.set_scale(name, float(w))  # peft ignores names the layer does not hold


def set_enabled_adapters(pipe: object, names: Sequence[str]) -> None:
    """Exactly these adapters are applied in the ordinary (not per-sample) forward."""
    _require_known(pipe, names)
    _require_unmerged(pipe, "enable or disable adapters")
    _set_active(pipe, list(dict.fromkeys(names)))


def enable_adapters(pipe: object, names: Sequence[str] | None = None) -> None:
    """Enable the named adapters (all if None), keeping the others' state."""
    names = adapter_names(pipe) if names is None else list(names)
    set_enabled_adapters(pipe, [*enabled_adapters(pipe), *names])


def disable_adapters(pipe: object, names: Sequence[str] | None = None) -> None:
    """Disable the named adapters (all if None): the forward then runs without them."""
    _require_known(pipe, names or [])
    off = set(adapter_names(pipe) if names is None else names)
    set_enabled_adapters(pipe, [n for n in enabled_adapters(pipe) if n not in off])


def delete_adapter(pipe: object, adapter_name: str) -> None:
    """Remove an adapter; layers left without adapters are unwrapped back to the original modules."""
    _require_known(pipe, [adapter_name])
    _require_unmerged(pipe, "delete an adapter")
    enabled = [n for n in enabled_adapters(pipe) if n != adapter_name]
    for root in components_of(pipe).values():
        for path, layer in [(p, m) for p, m in root.named_modules() if isinstance(m, LoraLayer)]:
            if adapter_name in layer.lora_A:
                layer.delete_adapter(adapter_name)
            if not layer.lora_A:
                parent, _, child = path.rpartition(".")
                setattr(root.get_submodule(parent) if parent else root, child, layer.get_base_layer())
        configs = getattr(root, "peft_config", None)
        if isinstance(configs, dict):
            configs.pop(adapter_name, None)
            if not configs:
                del root.peft_config
    _set_active(pipe, enabled)


# --- merging into the base weights ----------------------------------------------------------------------


def _restore(layer: LoraLayer) -> None:
    layer.get_base_layer().weight.data = getattr(layer, _MERGE_ORIGINAL)
    delattr(layer, _MERGE_ORIGINAL)
    layer.merged_adapters = []


def merge_adapters(pipe: object) -> list[str]:
    """Add every enabled adapter's weight · ΔW into the base weights (forward then costs what the base costs).

    Checks each layer's merged weight for NaN/inf and raises `LorafuseError` naming the adapter and module
    whose ΔW made it non-finite; then nothing stays merged. Returns the merged adapter names.
    Already-merged adapters are unmerged (exactly) first, so merging after a change of weights is correct.
    """
    names = enabled_adapters(pipe)
    if not names:
        raise UserInputError("no enabled adapters to merge")
    unmerge_adapters(pipe)
    done: list[LoraLayer] = []
    try:
        for component, path, layer in _layers(pipe):
            present = [n for n in names if n in layer.lora_A]
            if not present:
                continue
            weight = layer.get_base_layer().weight
            original = weight.data
            merged = original.to(torch.float32, copy=True)
            for name in present:
                merged += layer.get_delta_weight(name).float()
                if not torch.isfinite(merged).all():
                    raise LorafuseError(
                        f"adapter {name!r}: merging it into {component}.{path} gives non-finite weights (NaN/inf); "
                        "the adapter is broken or its weight too large. Nothing was merged."
                    )
            # Keep the pre-merge tensor rather than subtracting ΔW at unmerge: (W + ΔW) − ΔW is not W in floating
            # point, and switching adapters per step would accumulate the residue. A new tensor leaves it intact.
            setattr(layer, _MERGE_ORIGINAL, original)
            weight.data = merged.to(original.dtype)
            layer.merged_adapters = list(present)  # peft's flag: forward now runs the base layer alone
            done.append(layer)
    except BaseException:
        for layer in done:
            _restore(layer)
        raise
    return names


def unmerge_adapters(pipe: object) -> int:
    """Restore the exact pre-merge base weights; return the number of layers restored."""
    n = 0
    for _, _, layer in _layers(pipe):
        if hasattr(layer, _MERGE_ORIGINAL):
            _restore(layer)
            n += 1
        elif layer.merged:  # merged by peft directly (layer.merge): only its subtraction can undo that
            layer.unmerge()
            n += 1
    return n


# --- per-sample adapters ------------------------------------------------------------------------------


@contextlib.contextmanager
def per_sample_adapters(module: nn.Module, names_per_sample: Sequence[str]) -> Iterator[None]:
    """Inside the block, sample i of every forward of `module` uses adapter names_per_sample[i] ("__base__": none).

    peft's mixed-batch forward: each LoRA layer splits its batch by adapter name, so one batched forward equals
    separate forwards per sample. It uses each adapter's current weight and ignores which adapters are
    enabled (a disabled adapter named here is applied). Needs unmerged adapters and a batch of exactly
    len(names_per_sample) at every LoRA layer (a UNet forward, not a whole pipeline call).
    """
    names = list(names_per_sample)
    layers = [m for m in module.modules() if isinstance(m, LoraLayer)]
    present: set[str] = set()
    for layer in layers:
        present.update(layer.lora_A.keys())
    unknown = sorted(set(names) - present - {BASE})
    if unknown:
        have = ", ".join(repr(n) for n in sorted(present)) or "none"
        raise UserInputError(
            f"unknown adapter(s) {', '.join(map(repr, unknown))} per sample; present: {have}"
        )
    if any(layer.merged for layer in layers):
        raise UserInputError("per-sample adapters need unmerged adapters; call unmerge_adapters first")

    def add_names(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs["adapter_names"] = names
        return args, kwargs

    handles = [layer.register_forward_pre_hook(add_names, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def cfg_adapter_names(batch_size: int, cond: str, uncond: str = BASE) -> list[str]:
    """Names for a CFG batch laid out as diffusers does, torch.cat([uncond, cond]): (B) -> (2B) samples."""
    return [uncond] * batch_size + [cond] * batch_size
