"""Exact LoRA merges (docs/algorithms.md §1) and fusing a LoRA into the base weights.

Notation: content LoRA ΔW_c = s_c B_c A_c, style LoRA ΔW_s = s_s B_s A_s, user weights w_c, w_s.

`merge_loras(..., mode="exact")` (the default, "direct merge") stores ΔW = w_c ΔW_c + w_s ΔW_s exactly, as one
LoRA of rank r_c + r_s:  B = [w_c s_c B_c | w_s s_s B_s],  A = [A_c ; A_s],  alpha = rank (scale 1).
Ranks may differ, conv (LoCon) modules concatenate the same way, a module present in only one LoRA is kept
(w · s · B, A), and any number of LoRAs can be merged. Dense modules (LoHa / LoKr) are first factored exactly
(`resize.factorize`). Factors are stored in float32 by default so the merge stays exact.

How this differs from kohya `networks/merge_lora.py` (its default, without --concat): kohya adds the factors
separately, up = Σ_i |√(α_i/α_0) w_i| up_i and down = Σ_i √(α_i/α_0) w_i down_i (α_0: alpha of the first file
with that module). The product then contains cross terms B_i A_j (i ≠ j) that belong to neither LoRA, each
LoRA's own term is weighted by w_i·|w_i| (a ratio of 0.5 gives a quarter), and it refuses different ranks.
With --concat it concatenates like us but keeps alpha_0 over the summed rank, which shrinks the scale: two
equal-rank LoRAs at 1:1 come out as their average. That behaviour is offered only as `mode="kohya_legacy"`,
to reproduce old files and compare against, never as a default. (PEFT's `add_weighted_adapter` "linear" mixes
A and B separately too; only its "cat" is exact.)

`mode="svd"`: the exact sum, then a truncated SVD to `rank` (kohya `svd_merge_lora.py` semantics, without its
99th-percentile clamping of the factors, which changes ΔW for no stated reason).

`fuse_into(pipe, state, weight)` adds weight · ΔW to the base weights, with a finite check; `unfuse(pipe)`
restores the exact original weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lorafuse.errors import LorafuseError, UserInputError
from lorafuse.lora.resize import factorize, resize_lora
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import components_of
from lorafuse.lora.validate import validate_lora

MERGE_MODES = ("exact", "svd", "kohya_legacy")
MERGE_METADATA_KEY = "lorafuse.merge"

# attribute on a fused nn.Linear / nn.Conv2d holding its pre-fuse weight tensor (see `fuse_into`)
_FUSED_ORIGINAL = "_lorafuse_fused_original"


def _low_rank(module: LoraModule) -> LoraModule:
    return factorize(module.delta) if module.down is None else module


def _fit_layout(
    down: torch.Tensor, up: torch.Tensor, like: torch.Tensor, like_up: torch.Tensor, key: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring (down, up) to the layout of `like` (another LoRA's down for the same module).

    A 2-D LoRA and a 1x1-conv LoRA of the same 1x1 conv hold the same numbers (SD1.5 `proj_in` is saved
    both ways by different trainers); anything else that differs is two different modules under one key.
    """
    same_out = up.shape[0] == like_up.shape[0]
    if same_out and down.shape[1:] == like.shape[1:]:
        return down, up
    if same_out and down.dim() == 2 and like.dim() == 4 and like.shape[1:] == (down.shape[1], 1, 1):
        return down[:, :, None, None], up[:, :, None, None]
    if same_out and down.dim() == 4 and like.dim() == 2 and down.shape[1:] == (like.shape[1], 1, 1):
        return down.flatten(1), up.flatten(1)
    raise UserInputError(
        f"{key}: the LoRAs disagree on this module's shape (down {tuple(like.shape)}, up {tuple(like_up.shape)} vs "
        f"down {tuple(down.shape)}, up {tuple(up.shape)}); "
        "they were made for different base models and cannot be merged"
    )


def _merge_exact(modules: Sequence[tuple[LoraModule, float]], key: str, dtype: torch.dtype) -> LoraModule:
    downs: list[torch.Tensor] = []
    ups: list[torch.Tensor] = []
    for module, weight in modules:
        module = _low_rank(module)
        down, up = module.down.float(), module.up.float()
        if downs:
            down, up = _fit_layout(down, up, downs[0], ups[0], key)
        downs.append(down)
        ups.append(weight * module.scale * up)  # (out, r_i[, 1, 1])
    down = torch.cat(downs, dim=0)  # (Σ r_i, in[, kh, kw])
    up = torch.cat(ups, dim=1)  # (out, Σ r_i[, 1, 1])
    return LoraModule(down=down.to(dtype), up=up.to(dtype), alpha=float(down.shape[0]))


def _merge_kohya_legacy(
    modules: Sequence[tuple[LoraModule, float]], key: str, dtype: torch.dtype
) -> LoraModule:
    """kohya merge_lora.py without --concat, reproduced for comparison (see the module docstring)."""
    first = _low_rank(modules[0][0])
    base_alpha = first.alpha if first.alpha is not None else float(first.rank)
    down = torch.zeros_like(first.down, dtype=torch.float32)
    up = torch.zeros_like(first.up, dtype=torch.float32)
    for module, weight in modules:
        module = _low_rank(module)
        if module.down.shape != first.down.shape or module.up.shape != first.up.shape:
            raise UserInputError(
                f"{key}: kohya_legacy merging needs equal ranks and shapes (down {tuple(first.down.shape)} vs "
                f"{tuple(module.down.shape)}), as kohya's merge_lora.py does; use mode='exact', which merges "
                "different ranks without approximation"
            )
        alpha = module.alpha if module.alpha is not None else float(module.rank)
        factor = math.sqrt(alpha / base_alpha) * weight
        down += factor * module.down.float()
        up += abs(factor) * module.up.float()  # kohya: the sign of a negative ratio goes to down only
    return LoraModule(down=down.to(dtype), up=up.to(dtype), alpha=base_alpha)


def merge_loras(
    states: Sequence[LoraState],
    weights: Sequence[float],
    *,
    mode: str = "exact",
    rank: int | None = None,
    conv_rank: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoraState:
    """One LoRA whose ΔW is Σ_i weights[i] · ΔW_i (see the module docstring for the modes).

    mode: "exact" (rank-concatenated, exact), "svd" (exact sum truncated to `rank` / `conv_rank`; the relative
    error is recorded in the metadata under "lorafuse.merge") or "kohya_legacy" (kohya's lossy factor sum).
    A LoRA with weight 0 contributes nothing (its rank is not spent on zeros).
    """
    if mode not in MERGE_MODES:
        raise UserInputError(f"unknown merge mode {mode!r}; choose from {', '.join(MERGE_MODES)}")
    if len(states) != len(weights):
        raise UserInputError(f"{len(states)} LoRAs but {len(weights)} weights; give one weight per LoRA")
    if not states:
        raise UserInputError("nothing to merge: no LoRAs given")
    if mode == "svd" and rank is None:
        raise UserInputError("mode='svd' needs a target rank (rank=..., --rank)")
    for w in weights:
        if not math.isfinite(w):
            raise UserInputError(f"merge weights must be finite numbers, got {w}")

    by_key: dict[str, list[tuple[LoraModule, float]]] = {}
    for state, weight in zip(states, weights, strict=True):
        if weight == 0:
            continue
        for key, module in state.modules.items():
            by_key.setdefault(key, []).append((module, float(weight)))
    if not by_key:
        raise UserInputError("every merge weight is 0: the merged LoRA would be empty")

    combine = _merge_kohya_legacy if mode == "kohya_legacy" else _merge_exact
    merged = LoraState(
        modules={key: combine(parts, key, dtype) for key, parts in sorted(by_key.items())},
        source_format="merged",
    )
    record: dict[str, object] = {
        "mode": mode,
        "weights": [float(w) for w in weights],
        # file names only: a shared LoRA should not carry the author's folder layout
        "sources": [
            Path(s.source_path).name if s.source_path else f"<LoRA {i}>" for i, s in enumerate(states)
        ],
    }
    if mode == "svd":
        assert rank is not None
        merged, report = resize_lora(merged, rank, conv_rank=conv_rank, dtype=dtype)
        record.update(rank=rank, conv_rank=report.conv_rank, svd_rel_error=report.total_rel_error)
    merged.metadata = {MERGE_METADATA_KEY: json.dumps(record)}
    return merged


# --- fusing into the base weights ---------------------------------------------------------------------


def _base_layer(module: nn.Module) -> nn.Module:
    # a peft-wrapped layer: fuse into the weight its adapters are applied on top of
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if get_base is not None else module


def fuse_into(pipe: object, state: LoraState, weight: float = 1.0, *, arch: str | None = None) -> int:
    """Add weight · ΔW of every matching module to the base weights; return the number of modules fused.

    pipe: a pipeline, a {component: module} mapping or a UNet. Keys are checked first (`validate_lora`).
    Non-finite results raise `LorafuseError` naming the module, and nothing stays fused from this call.
    Fusing several LoRAs stacks; `unfuse` then restores the weights from before the first fuse.
    """
    from lorafuse.lora.inject import pipeline_arch  # lazy: merging files needs no peft import

    if not math.isfinite(weight):
        raise UserInputError(f"fuse weight must be a finite number, got {weight}")
    report = validate_lora(state, pipe, arch=arch or pipeline_arch(pipe))
    comps = components_of(pipe)
    done: list[tuple[nn.Parameter, torch.Tensor, nn.Module, bool]] = []
    try:
        for key, ref in sorted(report.targets.items()):
            layer = comps[ref.component].get_submodule(ref.path)
            if getattr(layer, "merged", False):
                raise UserInputError(
                    f"{ref.component}.{ref.path} has merged adapters; call unmerge_adapters first, then fuse"
                )
            base = _base_layer(layer)
            param = base.weight
            old = param.data
            delta = state.modules[key].delta_weight(tuple(old.shape)).to(old.device)
            new = (old.float() + weight * delta).to(old.dtype)
            if not torch.isfinite(new).all():
                raise LorafuseError(
                    f"{state.source_path or 'LoRA'}: fusing {key} at weight {weight} gives non-finite weights "
                    "(NaN/inf); the LoRA is broken or the weight too large. Nothing was fused."
                )
            first = not hasattr(base, _FUSED_ORIGINAL)
            if first:
                # Keep the original tensor instead of subtracting ΔW later: in floating point (W + ΔW) − ΔW is
                # not W (each add rounds, visibly so in fp16), and K-LoRA-style switching fuses and unfuses
                # every step, so the residue would accumulate. Assigning a new tensor keeps the old one intact.
                setattr(base, _FUSED_ORIGINAL, old)
            param.data = new
            done.append((param, old, base, first))
    except BaseException:
        for param, old, base, first in reversed(done):
            param.data = old
            if first:
                delattr(base, _FUSED_ORIGINAL)
        raise
    return len(done)


def unfuse(pipe: object) -> int:
    """Restore every fused weight to the exact tensor it had before the first `fuse_into`; return how many."""
    comps = components_of(pipe)
    merged = [m for root in comps.values() for m in root.modules() if getattr(m, "merged", False) is True]
    if merged:
        # the merge kept a copy of the fused weight; restoring the base under it would corrupt both
        raise UserInputError(
            "adapters are merged into fused weights; call unmerge_adapters first, then unfuse"
        )
    n = 0
    for root in comps.values():
        for module in root.modules():
            original = getattr(module, _FUSED_ORIGINAL, None)
            if original is not None:
                module.weight.data = original
                delattr(module, _FUSED_ORIGINAL)
                n += 1
    return n


def is_fused(pipe: object) -> bool:
    return any(hasattr(m, _FUSED_ORIGINAL) for root in components_of(pipe).values() for m in root.modules())
