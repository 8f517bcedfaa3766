"""CRAFT-LoRA aggregation weights from prompt markers (`docs/algorithms.md`, CRAFT section).

Notation map: `lambda_c` / `lambda_s` are λ_c / λ_s, the aggregation weights of ΔW_c|I_c and ΔW_s|I_s; the marked
spans (`lorafuse.fusion.markers`) are the texts the expert encoder embeds (E_c, E_s).

Default aggregation: λ_c = 1 if `<c>` is present else 0, λ_s likewise. An explicit override always wins (also for
a branch without its marker); values outside [0, 1] are allowed with a `CraftWeightWarning`.
"""

from __future__ import annotations

import math
import warnings

from lorafuse.errors import UserInputError
from lorafuse.fusion.markers import MarkedPrompt


class CraftWeightWarning(UserWarning):
    """An aggregation weight λ outside [0, 1]: allowed (the paper's users may push a branch), but unusual."""


def _check_override(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserInputError(f"{name} must be a finite number, got {value!r}")
    if not 0.0 <= value <= 1.0:
        warnings.warn(
            f"{name}={value} is outside [0, 1]: the {name[-1]} LoRA is {'extrapolated' if value > 1 else 'inverted'}",
            CraftWeightWarning,
            stacklevel=3,
        )
    return float(value)


def aggregation_weights(
    parsed: MarkedPrompt | None, lambda_c: float | None = None, lambda_s: float | None = None
) -> tuple[float, float]:
    """(λ_c, λ_s): an override when given, else 1 if the prompt has the marker, else 0.

    parsed: None (no marked prompt known) counts as both markers present: both LoRAs at full weight.
    """
    default_c = 1.0 if parsed is None or parsed.has_content else 0.0
    default_s = 1.0 if parsed is None or parsed.has_style else 0.0
    lc = default_c if lambda_c is None else _check_override("lambda_c", lambda_c)
    ls = default_s if lambda_s is None else _check_override("lambda_s", lambda_s)
    return lc, ls


