"""The contracts every guidance policy and per-step fusion plugs into.

Three small pieces, in the spirit of k-diffusion's `model(x, sigma, **extra)`:

- `ModelFn`: `(x, t, cond) -> prediction`, one denoiser forward over the rows of `x`. Each base-model family
  makes its own (`Family.model_fn`: `UNetDenoiser`, `FluxDenoiser`); a guidance policy may wrap it (per-sample adapters around the call), never the sampling loop.
- `Guidance`: `(model_fn, latents, t, step_index, num_steps, cond) -> noise_pred`, turns a conditional /
  unconditional pair of prompts into one guided prediction per image. `ClassifierFreeGuidance` is the default.
- `StepHook`: `before_step(step_index, num_steps, unet)` runs before each step's guidance call, so weight-level
  fusions (K-LoRA's per-layer choice, LoRA Switch's rotation) change the UNet between steps.

Step indices follow the spec: `i = 0 ... T-1`, 0 is the noisiest step, `T = num_steps` model evaluations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from lorafuse.families.conditioning import Conditioning, GuidanceCond
from lorafuse.families.unet import UNetDenoiser

__all__ = ["COND", "UNCOND", "Conditioning", "FunctionHook", "Guidance", "GuidanceCond", "ModelFn", "StepHook",
           "UNetDenoiser"]  # fmt: skip

# Labels of the rows of a batched guidance forward (see `ClassifierFreeGuidance.branch_context`).
UNCOND = "uncond"
COND = "cond"


class ModelFn(Protocol):
    """One denoiser forward: x (N, C, h, w) already scaled by the scheduler, t a scalar timestep -> eps."""

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor: ...


class Guidance(Protocol):
    """A guidance policy: one guided noise prediction (B, C, h, w) for the B images in `latents`.

    latents: (B, C, h, w), already passed through `scheduler.scale_model_input`
    cond:    prompt and negative-prompt conditioning, B rows each
    A policy may call `model_fn` any number of times on any rows (CFG: once on 2B rows; LoRA Composite: once
    per LoRA), and may wrap each call in a context (per-sample adapters for asymmetric CFG).
    """

    def __call__(
        self,
        model_fn: ModelFn,
        latents: Tensor,
        t: Tensor,
        step_index: int,
        num_steps: int,
        cond: GuidanceCond,
    ) -> Tensor: ...


@runtime_checkable
class StepHook(Protocol):
    """Changes the UNet between steps (K-LoRA's per-layer choice, LoRA Switch's active LoRA).

    `before_step` runs before the guidance call of every step; `after_sampling` runs once when sampling ends,
    also after an error, and should put the UNet back the way it was found.
    """

    def before_step(self, step_index: int, num_steps: int, unet: torch.nn.Module) -> None: ...

    def after_sampling(self, unet: torch.nn.Module) -> None: ...


@dataclass(frozen=True)
class FunctionHook:
    """A `StepHook` from a plain function `fn(step_index, num_steps, unet)`, with nothing to undo."""

    fn: Callable[[int, int, torch.nn.Module], None]

    def before_step(self, step_index: int, num_steps: int, unet: torch.nn.Module) -> None:
        self.fn(step_index, num_steps, unet)

    def after_sampling(self, unet: torch.nn.Module) -> None:
        pass
