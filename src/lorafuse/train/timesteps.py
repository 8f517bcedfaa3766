"""Which timesteps and noise a training step sees.

Content/style bias (ai-toolkit's `content_or_style`, docs/algorithms.md §8): content forms early in sampling
(noisy t), style late (clean t), so a content LoRA samples noisy timesteps more often and a style LoRA clean ones.
We draw u ~ U(0, 1) and map u³ toward the favoured end of [t_min, t_max).
"""

from __future__ import annotations

from typing import Literal

import torch

TimestepBias = Literal["none", "content", "style"]


def sample_timesteps(
    batch: int,
    generator: torch.Generator | None,
    *,
    t_min: int = 0,
    t_max: int = 1000,
    bias: TimestepBias = "none",
) -> torch.Tensor:
    if not 0 <= t_min < t_max:
        raise ValueError(f"timestep range must satisfy 0 <= min < max, got [{t_min}, {t_max})")
    if bias == "none":
        return torch.randint(t_min, t_max, (batch,), generator=generator)
    u = torch.rand(batch, generator=generator) ** 3  # mass near 0
    span = t_max - 1 - t_min
    t = t_max - 1 - u * span if bias == "content" else t_min + u * span
    return t.round().long()


def noise_like(
    latents: torch.Tensor, generator: torch.Generator | None, noise_offset: float = 0.0
) -> torch.Tensor:
    """ε ~ N(0, I), plus kohya's noise offset: a per-(sample, channel) constant shift (helps very dark/bright)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(
            latents.shape[:2] + (1, 1), generator=generator, dtype=latents.dtype
        )
    return noise
