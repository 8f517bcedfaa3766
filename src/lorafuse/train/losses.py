"""Training losses with kohya sd-scripts semantics (docs/algorithms.md §8).

Notation: p = model prediction, y = target (ε, or v for v-prediction bases), t = diffusion timestep,
ᾱ_t = alphas_cumprod[t], σ_t = √((1 − ᾱ_t)/ᾱ_t), SNR = ᾱ_t / (1 − ᾱ_t) = 1/σ_t².
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch

LossType = Literal["l2", "l1", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]


def huber_c_for(
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    huber_c: float,
    schedule: HuberSchedule,
    num_train_timesteps: int = 1000,
    huber_scale: float = 1.0,
) -> torch.Tensor:
    """Per-sample Huber c (B,). constant: c; exponential: exp(−(−ln c / T)·t)·scale; snr: (1−c)/(1+σ_t)² + c."""
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, huber_c)
    if schedule == "exponential":
        alpha = -math.log(huber_c) / num_train_timesteps
        return torch.exp(-alpha * t) * huber_scale
    if schedule == "snr":
        a = alphas_cumprod.to(t.device)[timesteps]
        sigma = ((1 - a) / a).sqrt()
        return (1 - huber_c) / (1 + sigma) ** 2 + huber_c
    raise ValueError(f"unknown huber_schedule {schedule!r}; allowed: constant, exponential, snr")


def elementwise_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: LossType, huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """Unreduced loss, same shape as pred. Huber variants take per-sample c of shape (B,)."""
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        return (pred - target) ** 2
    if loss_type == "l1":
        return (pred - target).abs()
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs huber_c")
    c = huber_c.view(-1, *([1] * (pred.dim() - 1)))
    root = torch.sqrt((pred - target) ** 2 + c**2) - c
    if loss_type == "huber":  # pseudo-Huber: 2c(√((p−y)² + c²) − c)
        return 2 * c * root
    if loss_type == "smooth_l1":  # kohya's "smooth_l1": 2(√((p−y)² + c²) − c)
        return 2 * root
    raise ValueError(f"unknown loss_type {loss_type!r}; allowed: l2, l1, huber, smooth_l1")


def min_snr_weight(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, v_prediction: bool = False
) -> torch.Tensor:
    """min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for v-prediction (B,)."""
    from types import SimpleNamespace

    from diffusers.training_utils import compute_snr

    snr = compute_snr(SimpleNamespace(alphas_cumprod=alphas_cumprod), timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if v_prediction else clipped / snr


def debiased_weight(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, v_prediction: bool = False) -> torch.Tensor:
    """1/√SNR (ε-prediction) or 1/(SNR + 1) (v-prediction), SNR capped at 1000 (t = 0 has SNR near infinity) (B,)."""
    from types import SimpleNamespace

    from diffusers.training_utils import compute_snr

    snr = torch.clamp(compute_snr(SimpleNamespace(alphas_cumprod=alphas_cumprod), timesteps), max=1000)
    return 1 / (snr + 1) if v_prediction else 1 / torch.sqrt(snr)


def warn_inert_huber(loss_type: str, huber_c: float, huber_schedule: str, default_c: float = 0.1) -> None:
    if loss_type in ("l2", "l1") and (huber_c != default_c or huber_schedule != "snr"):
        warnings.warn(
            f"huber_c / huber_schedule are set but loss_type is {loss_type!r}: they have no effect",
            stacklevel=2,
        )


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    loss_type: LossType = "l2",
    huber_c: float = 0.1,
    huber_schedule: HuberSchedule = "snr",
    min_snr_gamma: float | None = None,
    v_prediction: bool = False,
    sample_weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    debiased: bool = False,
) -> torch.Tensor:
    """Scalar loss: elementwise loss (× the pixel mask (B, 1, H, W) area-resized to the latents, train/masks.py),
    mean per sample, × min-SNR weight, × debiased-estimation weight, × sample weight (prior loss), mean."""
    c = None
    if loss_type in ("huber", "smooth_l1"):
        c = huber_c_for(timesteps, alphas_cumprod, huber_c, huber_schedule, len(alphas_cumprod))
    loss = elementwise_loss(pred, target, loss_type, c)
    if mask is not None:
        from lorafuse.train.masks import apply_mask

        loss = apply_mask(loss, mask)
    per_sample = loss.mean(dim=tuple(range(1, pred.dim())))
    if min_snr_gamma:
        per_sample = per_sample * min_snr_weight(timesteps, alphas_cumprod, min_snr_gamma, v_prediction)
    if debiased:
        per_sample = per_sample * debiased_weight(timesteps, alphas_cumprod, v_prediction)
    if sample_weight is not None:
        per_sample = per_sample * sample_weight
    return per_sample.mean()
