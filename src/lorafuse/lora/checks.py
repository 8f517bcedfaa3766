"""Is a LoRA's *effective* update sane? Checked once, where the file is read (and against the base's weights
where a base is known), because a bad number otherwise shows up only as a black or noisy image.

- tensors: floating dtype only (an integer LoRA would be applied as if its integers were weights);
- alpha: one finite positive number per module. Zero means "absent" (alpha = rank), as kohya and A1111 read it,
  with a warning; absent in some modules but present in others is a warning naming them (the absent ones get
  scale 1, which is rarely what the trainer meant);
- ΔW = (alpha / r) · B A must be finite and of a plausible size: its entries' RMS at most `ABS_RMS_LIMIT`
  without a base, and ‖ΔW‖_F at most `RELATIVE_ERROR` x ‖W‖_F of the base weight it applies to (a warning
  above `RELATIVE_WARN`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch

from lorafuse.errors import LoraFormatError
from lorafuse.lora.state import LoraModule, LoraState

# No real checkpoint has weight entries near 100 in magnitude (SD/SDXL RMS is ~0.02-0.2), so an update whose
# entries average that is a broken alpha or a diverged run, whatever the base.
ABS_RMS_LIMIT = 100.0
# ‖ΔW‖ / ‖W‖: trained LoRAs at weight 1 sit well below 1; 10x the base already drowns it, 100x is noise.
RELATIVE_WARN = 10.0
RELATIVE_ERROR = 100.0
N_NAMED = 3


class LoraValueWarning(UserWarning):
    """A LoRA value that is legal but probably not what its author meant (missing alpha, very large update)."""


def _is_alpha(key: str) -> bool:
    return key == "alpha" or key.endswith(".alpha")


def check_tensors(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Dtypes, finiteness and alpha values of a file's raw tensors (returned unchanged)."""
    zero_alpha = []
    for key, t in tensors.items():
        if _is_alpha(key):
            if t.dtype == torch.bool or t.is_complex():
                raise LoraFormatError(f"{source}: {key} has dtype {_dtype(t)}; alpha must be a number")
            if t.numel() != 1:
                raise LoraFormatError(
                    f"{source}: {key} holds {t.numel()} values (shape {tuple(t.shape)}); alpha is one number per "
                    "module. The file is damaged or was written by a tool lorafuse does not know."
                )
            value = float(t.reshape(()).double())
            if not math.isfinite(value):
                raise LoraFormatError(f"{source}: {key} is {value}; alpha must be a finite positive number")
            if value < 0:
                raise LoraFormatError(
                    f"{source}: {key} is {value:g}; a negative alpha flips the update's sign, which no trainer "
                    "writes. Fix the file (alpha is usually the rank or half of it)."
                )
            if value == 0:
                zero_alpha.append(key)  # the format readers read 0 as "absent"
            continue
        if not t.is_floating_point():
            raise LoraFormatError(
                f"{source}: tensor {key!r} has dtype {_dtype(t)}; LoRA weights must be floating point "
                "(float32, float16 or bfloat16). The file was not written by a LoRA trainer, or is damaged."
            )
        if not torch.isfinite(t).all():
            n = int((~torch.isfinite(t)).sum())
            raise LoraFormatError(
                f"{source}: tensor {key!r} has {n} non-finite values (NaN/inf); the file is damaged or its "
                "training diverged. Refusing to load it."
            )
    if zero_alpha:
        warnings.warn(
            f"{source}: alpha is 0 in {len(zero_alpha)} module(s) ({_names(zero_alpha)}); read as alpha = rank "
            "(scale 1), as kohya and A1111 do",
            LoraValueWarning,
            stacklevel=3,
        )
    return tensors


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - N_NAMED} more" if len(keys) > N_NAMED else ""
    return ", ".join(keys[:N_NAMED]) + more


def warn_missing_alpha(with_alpha: list[str], without: list[str], source: str) -> None:
    """Some modules store alpha, others not: the others get scale 1 (alpha = rank), likely by mistake."""
    if with_alpha and without:
        warnings.warn(
            f"{source}: {len(without)} of {len(with_alpha) + len(without)} modules have no alpha while the others "
            f"do ({_names(sorted(without))}); they are applied with alpha = rank (scale 1)",
            LoraValueWarning,
            stacklevel=4,
        )


def update_norm(module: LoraModule) -> float:
    """‖ΔW‖_F in float64 without forming ΔW: ‖s B A‖² = s² tr((BᵀB)(AAᵀ)), two r x r products."""
    if module.delta is not None:
        return float(module.delta.double().norm())
    assert module.down is not None and module.up is not None
    up = module.up.double().flatten(1)  # (out, r)
    down = module.down.double().flatten(1)  # (r, in·kh·kw)
    sq = float(((up.T @ up) * (down @ down.T)).sum())  # tr(XY) = Σ X ⊙ Yᵀ, both symmetric
    return abs(module.scale) * math.sqrt(max(sq, 0.0))


def _numel(module: LoraModule) -> int:
    if module.delta is not None:
        return module.delta.numel()
    assert module.down is not None and module.up is not None
    return int(module.up.shape[0]) * module.down[0].numel()


def check_magnitudes(state: LoraState) -> None:
    """Every module's ΔW finite and with entries of RMS below `ABS_RMS_LIMIT` (no base needed); a warning for
    ranks above the layer's size, which no trainer writes (swapped factors, or a broken export)."""
    source = state.source_path or "LoRA"
    oversized = []
    for key, module in state.modules.items():
        if module.down is not None and module.up is not None:
            out_f, in_f = int(module.up.shape[0]), module.down[0].numel()
            if module.rank > min(out_f, in_f):
                oversized.append(f"{_shown(state, key)}: rank {module.rank}, layer {out_f}x{in_f}")
        norm = update_norm(module)
        rms = norm / math.sqrt(max(_numel(module), 1))
        if not math.isfinite(norm) or rms > ABS_RMS_LIMIT:
            raise LoraFormatError(
                f"{source}: module {_shown(state, key)} has an absurd update: ΔW = (alpha/rank)·up·down has entries "
                f"of RMS {rms:.3g} (limit {ABS_RMS_LIMIT:g}; alpha {module.alpha}, rank {module.rank}). Applying it "
                "would give a black or noise image; the alpha or the factors are broken."
            )
    if oversized:
        warnings.warn(
            f"{source}: {len(oversized)} module(s) have a rank above their layer's size ({_names(oversized)}), "
            "which only stores a full-rank update at more than its size; are lora_up and lora_down swapped? "
            "`lorafuse resize` makes it a real low-rank LoRA",
            LoraValueWarning,
            stacklevel=3,
        )


def _shown(state: LoraState, key: str) -> str:
    return state.source_names.get(key, key)


def check_against_base(state: LoraState, weights: Mapping[str, torch.Tensor]) -> list[str]:
    """‖ΔW‖ / ‖W‖ per module against the base weights it targets ({LoRA key: weight}); an error past
    `RELATIVE_ERROR`, a warning (returned and issued) past `RELATIVE_WARN`."""
    source = state.source_path or "LoRA"
    large: list[tuple[float, str]] = []
    for key, weight in weights.items():
        if weight.is_meta:
            continue
        base_norm = float(weight.detach().double().norm())
        if base_norm == 0:
            continue
        ratio = update_norm(state.modules[key]) / base_norm
        if ratio > RELATIVE_ERROR:
            raise LoraFormatError(
                f"{source}: module {_shown(state, key)}: its update is {ratio:.3g} times the size of the base "
                f"weight (‖ΔW‖/‖W‖, limit {RELATIVE_ERROR:g}); it would wipe out the model. The alpha or the "
                "factors are broken, or the LoRA was made for another base."
            )
        if ratio > RELATIVE_WARN:
            large.append((ratio, _shown(state, key)))
    if not large:
        return []
    large.sort(reverse=True)
    shown = ", ".join(f"{k} ({r:.3g}x)" for r, k in large[:N_NAMED])
    message = (
        f"{source}: {len(large)} module update(s) are more than {RELATIVE_WARN:g} times the size of the base "
        f"weight they change ({shown}); expect a burnt image unless you lower this LoRA's weight"
    )
    warnings.warn(message, LoraValueWarning, stacklevel=3)
    return [message]
