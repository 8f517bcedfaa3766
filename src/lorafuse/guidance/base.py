"""The contracts every guidance policy and per-step fusion plugs into.

Three small pieces, in the spirit of k-diffusion's `model(x, sigma, **extra)`:

- `ModelFn`: `(x, t, cond) -> eps`, one UNet forward over the rows of `x`. `UNetDenoiser` is the only real one;
  a guidance policy may wrap it (per-sample adapters around the call), never the sampling loop.
- `Guidance`: `(model_fn, latents, t, step_index, num_steps, cond) -> noise_pred`, turns a conditional /
  unconditional pair of prompts into one guided prediction per image. `ClassifierFreeGuidance` is the default.
- `StepHook`: `before_step(step_index, num_steps, unet)` runs before each step's guidance call, so weight-level
  fusions (K-LoRA's per-layer choice, LoRA Switch's rotation) change the UNet between steps.

Step indices follow the spec: `i = 0 ... T-1`, 0 is the noisiest step, `T = num_steps` model evaluations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

# Labels of the rows of a batched guidance forward (see `ClassifierFreeGuidance.branch_context`).
UNCOND = "uncond"
COND = "cond"


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on, for N rows of a batch.

    embeds:   (N, L, D) text-encoder hidden states, the UNet's `encoder_hidden_states`
    pooled:   (N, P) SDXL pooled text embedding (`added_cond_kwargs["text_embeds"]`); None for SD1.5
    time_ids: (N, 6) SDXL size and crop conditioning (`added_cond_kwargs["time_ids"]`); None for SD1.5
    """

    embeds: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.pooled is None) != (self.time_ids is None):
            raise ValueError("SDXL conditioning needs both pooled embeds and time_ids, or neither (SD1.5)")
        rows = {len(x) for x in (self.embeds, self.pooled, self.time_ids) if x is not None}
        if len(rows) != 1:
            raise ValueError(f"conditioning tensors disagree on the number of rows: {sorted(rows)}")

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Rows of `parts` stacked in order: `cat([a, b])` has len(a) + len(b) rows."""

        def join(name: str) -> Tensor | None:
            tensors = [getattr(p, name) for p in parts]
            return None if tensors[0] is None else torch.cat(tensors)

        return Conditioning(join("embeds"), join("pooled"), join("time_ids"))

    def unet_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs


@dataclass(frozen=True)
class GuidanceCond:
    """The prompt (`cond`) and negative-prompt (`uncond`) conditioning of B images, B rows each."""

    cond: Conditioning
    uncond: Conditioning

    def __post_init__(self) -> None:
        if len(self.cond) != len(self.uncond):
            raise ValueError(f"cond has {len(self.cond)} rows but uncond has {len(self.uncond)}")

    def both(self) -> Conditioning:
        """(2B rows): uncond first, then cond, the order diffusers' pipelines use."""
        return Conditioning.cat([self.uncond, self.cond])


class ModelFn(Protocol):
    """One denoiser forward: x (N, C, h, w) already scaled by the scheduler, t a scalar timestep -> eps."""

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor: ...


@dataclass(frozen=True)
class UNetDenoiser:
    """`ModelFn` over a diffusers `UNet2DConditionModel` (SD1.5 or SDXL). `unet` is public so guidance
    policies can reach it, e.g. to enable per-sample adapters around the call."""

    unet: torch.nn.Module

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if len(x) != len(cond):
            raise ValueError(f"{len(x)} latent rows but {len(cond)} conditioning rows")
        return self.unet(x, t, **cond.unet_kwargs(), return_dict=False)[0]


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
