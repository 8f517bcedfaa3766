"""Timestep weight schedules: small pure functions of the step index.

Notation (docs/algorithms.md §0): step index `i = 0 ... T-1` (0 is the noisiest), progress `u = i / T` in [0, 1).
Content forms early and style late (K-LoRA, CRAFT), so content weights fall with u and style weights rise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from lorafuse.errors import UserInputError


def progress(step_index: int, num_steps: int) -> float:
    """u = i / T: 0 at the first (noisiest) step, (T-1)/T at the last."""
    if num_steps < 1:
        raise UserInputError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= step_index < num_steps:
        raise UserInputError(f"step_index must be in [0, {num_steps}), got {step_index}")
    return step_index / num_steps


def cosine_phi(u: float) -> float:
    """φ(u) = ½(1 + cos πu): 1 at u = 0, ½ at u = ½, 0 at u = 1, monotone decreasing (docs/algorithms.md §7.5)."""
    return 0.5 * (1.0 + math.cos(math.pi * u))


def window(u: float, start: float, end: float) -> float:
    """1.0 when start <= u < end, else 0.0. Fractions of the run, so windows keep their meaning at any T.

    CRAFT's reported windows at T = 50: content for steps 1-35 is `window(u, 0, 0.7)`, style for steps 15-50 is
    `window(u, 0.28, 1.0)` (1-based steps; u = i/T never reaches 1, so end = 1.0 includes the last step).
    """
    if not 0.0 <= start <= end <= 1.0:
        raise UserInputError(f"a window needs 0 <= start <= end <= 1, got start={start}, end={end}")
    return 1.0 if start <= u < end else 0.0


def window_weights(
    u: float,
    lambda_c: float = 1.0,
    lambda_s: float = 1.0,
    content: tuple[float, float] = (0.0, 0.7),
    style: tuple[float, float] = (0.28, 1.0),
) -> tuple[float, float]:
    """(ω_c, ω_s) = (λ_c · 1[u in content], λ_s · 1[u in style]); defaults are CRAFT's reported windows."""
    return lambda_c * window(u, *content), lambda_s * window(u, *style)


def smooth_weights(
    u: float,
    lambda_c: float = 1.0,
    lambda_s: float = 1.0,
    phi: Callable[[float], float] = cosine_phi,
) -> tuple[float, float]:
    """(ω_c, ω_s) = (λ_c φ(u), λ_s (1 − φ(u))): content early, style late (docs/algorithms.md §7.5)."""
    p = phi(u)
    return lambda_c * p, lambda_s * (1.0 - p)


def switch_index(step_index: int, tau: int, n: int) -> int:
    """LoRA Switch (docs/algorithms.md §3): the active LoRA of step i is (i // τ) mod N; τ = 5 in the paper."""
    if tau < 1 or n < 1:
        raise UserInputError(f"LoRA Switch needs tau >= 1 and at least one LoRA, got tau={tau}, n={n}")
    return (step_index // tau) % n


def switch_index_official(step_index: int, tau: int, n: int) -> int:
    """LoRA Switch as the official code runs it: it switches in a step-end callback when `i > 0 and i % τ == 0`,
    after step i has run, so LoRA 0 runs steps 0 … τ (τ + 1 steps) and every later LoRA τ steps."""
    if tau < 1 or n < 1:
        raise UserInputError(f"LoRA Switch needs tau >= 1 and at least one LoRA, got tau={tau}, n={n}")
    return (max(step_index - 1, 0) // tau) % n


def klora_scale(step_index: int, num_steps: int, alpha: float = 1.5, beta: float = 0.5) -> float:
    """K-LoRA's paper scale S(i) = α · i / T + β (docs/algorithms.md §2; the official code's wrapped "s*" pattern differs)."""
    return alpha * progress(step_index, num_steps) + beta
