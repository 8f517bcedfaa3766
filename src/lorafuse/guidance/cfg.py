"""Classifier-free guidance, its asymmetric (per-branch) form, and the averaged form of LoRA Composite.

Notation (docs/algorithms.md §0, §3, §7.5): `g` is the guidance scale, `eps_u` / `eps_c` the unconditional / conditional
predictions, `ε̂ = ε_u + g (ε_c − ε_u)`.

How the later policies plug in, without touching the sampling loop:
- Asymmetric CFG (CRAFT, docs/algorithms.md §7.5): `ClassifierFreeGuidance(g, branch_context=...)`. The context is entered around
  the one batched forward and told the step and the branch of every row, so it can run the "cond" rows with the
  LoRAs at ω(i) and the "uncond" rows on the base (`per_sample_adapters(unet, names)`), in one forward of 2B.
- LoRA Composite (docs/algorithms.md §3): `CompositeGuidance(ClassifierFreeGuidance(g), contexts)`, one context per LoRA that
  leaves only that LoRA active; the guided predictions are averaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lorafuse.errors import UserInputError
from lorafuse.guidance.base import COND, UNCOND, Conditioning, Guidance, GuidanceCond, ModelFn

# (step_index, num_steps, labels) -> context entered around one batched forward; labels[k] is UNCOND or COND
# for row k of that forward.
BranchContext = Callable[[int, int, Sequence[str]], AbstractContextManager[Any]]


def cfg_combine(eps_u: Tensor, eps_c: Tensor, scale: float) -> Tensor:
    """ε̂ = ε_u + g (ε_c − ε_u), written exactly as diffusers' pipelines do so results agree bit for bit."""
    return eps_u + scale * (eps_c - eps_u)


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """CFG with one batched forward of 2B rows (uncond first, as diffusers).

    scale: g >= 0. g = 1 runs only the conditional rows and g = 0 only the unconditional ones (one forward of
        B), since the formula then reduces to one branch. Unlike diffusers, which switches guidance off for every
        g <= 1 (so its g = 0.5 means g = 1), we apply the formula for every other g.
    branch_context: optional; see the module docstring (asymmetric CFG).
    """

    scale: float = 7.5
    branch_context: BranchContext | None = None

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float):
            raise UserInputError(f"guidance scale must be a number, got {type(self.scale).__name__}")
        if not math.isfinite(self.scale) or self.scale < 0:
            raise UserInputError(f"guidance scale must be finite and >= 0, got {self.scale}")

    def __call__(
        self,
        model_fn: ModelFn,
        latents: Tensor,
        t: Tensor,
        step_index: int,
        num_steps: int,
        cond: GuidanceCond,
    ) -> Tensor:
        b = len(latents)
        if self.scale == 1:
            return self._forward(model_fn, latents, t, step_index, num_steps, cond.cond, [COND] * b)
        if self.scale == 0:
            return self._forward(model_fn, latents, t, step_index, num_steps, cond.uncond, [UNCOND] * b)
        x = torch.cat([latents, latents])  # (B, C, h, w) -> (2B, C, h, w) for CFG
        eps = self._forward(model_fn, x, t, step_index, num_steps, cond.both(), [UNCOND] * b + [COND] * b)
        eps_u, eps_c = eps.chunk(2)  # (2B, C, h, w) -> 2 x (B, C, h, w)
        return cfg_combine(eps_u, eps_c, self.scale)

    def _forward(
        self,
        model_fn: ModelFn,
        x: Tensor,
        t: Tensor,
        step_index: int,
        num_steps: int,
        cond: Conditioning,
        labels: list[str],
    ) -> Tensor:
        if self.branch_context is None:
            return model_fn(x, t, cond)
        with self.branch_context(step_index, num_steps, labels):
            return model_fn(x, t, cond)


@dataclass(frozen=True)
class CompositeGuidance:
    """LoRA Composite: `ε̂ = mean_a guidance(...)` with context `a` active during the a-th call.

    contexts: one zero-argument factory per LoRA a; the context it returns leaves only LoRA a active.
    Costs one `guidance` call (2B rows for CFG) per LoRA and step.
    """

    guidance: Guidance
    contexts: Sequence[Callable[[], AbstractContextManager[Any]]]

    def __post_init__(self) -> None:
        if len(self.contexts) == 0:
            raise UserInputError("CompositeGuidance needs at least one adapter context, got none")

    def __call__(
        self,
        model_fn: ModelFn,
        latents: Tensor,
        t: Tensor,
        step_index: int,
        num_steps: int,
        cond: GuidanceCond,
    ) -> Tensor:
        preds = []
        for activate in self.contexts:
            with activate():
                preds.append(self.guidance(model_fn, latents, t, step_index, num_steps, cond))
        return torch.stack(preds).mean(dim=0)  # N x (B, C, h, w) -> (B, C, h, w)
