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
    latents: torch.Tensor,
    generator: torch.Generator | None,
    noise_offset: float = 0.0,
    multires: tuple[int, float] = (0, 0.3),
) -> torch.Tensor:
    """ε ~ N(0, I), plus kohya's noise offset: a per-(sample, channel) constant shift (helps very dark/bright);
    then kohya's multi-resolution ("pyramid") noise when multires = (iterations, discount) has iterations > 0."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(
            latents.shape[:2] + (1, 1), generator=generator, dtype=latents.dtype
        )
    if multires[0]:
        noise = pyramid_noise(noise, generator, *multires)
    return noise


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator | None, iterations: int, discount: float):
    """kohya's multires noise (Whitaker's pyramid noise): at level i, noise drawn at 1/r^i of the size (r uniform
    in [2, 4) per level), upsampled bilinearly and weighted discount^i, added; stops at 1x1; the sum is scaled
    to unit standard deviation over the batch."""
    b, c, h, w = noise.shape
    noise = noise.clone()
    for i in range(iterations):
        r = 2 + 2 * torch.rand((), generator=generator).item()
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        low = torch.randn((b, c, hn, wn), generator=generator, dtype=noise.dtype)
        noise += torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()
