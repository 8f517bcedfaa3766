"""Asymmetric, timestep-aware classifier-free guidance (CRAFT-LoRA, docs/algorithms.md §7.5, the CRAFT-LoRA paper, App. C).

    conditional rows:    W_cond(i) = W' + ω_c(i) ΔW_c|I_c + ω_s(i) ΔW_s|I_s
    unconditional rows:  W'                                   (no LoRA at all)
    ε̂ = ε_u(W') + g (ε_c(W_cond(i)) − ε_u(W'))

Notation map: `W'` is whatever the UNet's base weights are (the rank-limited backbone in CRAFT); `omega_c`,
`omega_s` are ω_c(i), ω_s(i); `lambda_c`, `lambda_s` are λ_c, λ_s; `g` is the guidance scale; `u = i / T`.

Schedules (`AcfgSchedule.kind`):
    "window"    ω_c = λ_c · 1[u in content_window], ω_s = λ_s · 1[u in style_window]; defaults (0, 0.7) and
                (0.28, 1.0): the paper's steps 1-35 and 15-50 of 50, as fractions so they hold at any T.
    "smooth"    ω_c = λ_c φ(u), ω_s = λ_s (1 − φ(u)), φ(u) = ½(1 + cos πu): content early, style late.
    "constant"  ω_c = λ_c, ω_s = λ_s at every step (ablation: no time dependence).
Ablation `symmetric=True`: standard CFG, the unconditional rows get the same LoRA weights as the conditional
ones (the paper's "uncond path uses cond weights"). "No backbone" is a plan option (W' = W), not a guidance one.

How it runs: ΔW_c|I_c and ΔW_s|I_s live in ONE peft adapter (the layer sets are disjoint, so one adapter can hold
both); before each step the layers of I_c get weight ω_c(i) and those of I_s ω_s(i), then the 2B rows
[uncond | cond] go through one batched forward with per-sample adapters (`lora.inject.per_sample_adapters`): the
uncond rows name "__base__", the cond rows the adapter. Cost: what CFG costs, plus the LoRA on B rows.
`BranchAdapter(..., mechanism="merged")` instead runs [uncond | cond] as two half-batch passes per layer on W and on
W + ω ΔW merged once per change of ω (`lora.row_split`): peft's per-layer gather/scatter is what made ACFG slow.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor

from lorafuse.errors import UserInputError
from lorafuse.guidance.base import UNCOND, GuidanceCond, ModelFn
from lorafuse.guidance.cfg import ClassifierFreeGuidance
from lorafuse.guidance.schedules import cosine_phi, progress, window_weights
from lorafuse.lora.inject import BASE, per_sample_adapters
from lorafuse.lora.row_split import RowSplitLayer, contiguous_split, set_split, wrap_row_split

SCHEDULE_KINDS = ("window", "smooth", "constant")
# how the rows of one batched forward get different weights: peft's mixed batch, or `lora.row_split`
MECHANISMS = ("peft", "merged")


@dataclass(frozen=True)
class AcfgSchedule:
    """(ω_c(i), ω_s(i)) for step i of T; see the module docstring."""

    kind: str = "window"
    lambda_c: float = 1.0
    lambda_s: float = 1.0
    content_window: tuple[float, float] = (0.0, 0.7)
    style_window: tuple[float, float] = (0.28, 1.0)
    phi: Callable[[float], float] = cosine_phi

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise UserInputError(
                f"unknown ACFG schedule {self.kind!r}; choose from {', '.join(SCHEDULE_KINDS)}"
            )
        for name in ("lambda_c", "lambda_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UserInputError(f"ACFG {name} must be a finite number, got {value!r}")
        for name in ("content_window", "style_window"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi <= 1.0:
                raise UserInputError(f"ACFG {name} must satisfy 0 <= start <= end <= 1, got ({lo}, {hi})")

    def weights(self, step_index: int, num_steps: int) -> tuple[float, float]:
        u = progress(step_index, num_steps)
        if self.kind == "window":
            return window_weights(u, self.lambda_c, self.lambda_s, self.content_window, self.style_window)
        if self.kind == "smooth":
            p = self.phi(u)
            return self.lambda_c * p, self.lambda_s * (1.0 - p)
        return float(self.lambda_c), float(self.lambda_s)

    def table(self, num_steps: int) -> list[tuple[float, float]]:
        return [self.weights(i, num_steps) for i in range(num_steps)]


class BranchAdapter:
    """The one peft adapter that holds ΔW_c on the layers `content` (I_c) and ΔW_s on `style` (I_s).

    unet: the module holding the peft layers; content / style: module paths inside it (disjoint).
    `set_weights(ω_c, ω_s)` sets each group's weight (ΔW scales linearly; 0 is the base output exactly).
    """

    def __init__(
        self, unet: torch.nn.Module, name: str, content: Sequence[str], style: Sequence[str],
        mechanism: str = "peft",
    ) -> None:  # fmt: skip
        overlap = sorted(set(content) & set(style))
        if overlap:
            raise UserInputError(
                f"content and style layers must be disjoint; {len(overlap)} shared, e.g. {', '.join(overlap[:4])}"
            )
        self.unet, self.name = unet, name
        self.groups: dict[str, list[LoraLayer]] = {"content": [], "style": []}
        for group, paths in (("content", content), ("style", style)):
            for path in paths:
                layer = unet.get_submodule(path)
                if not isinstance(layer, LoraLayer) or name not in layer.lora_A:
                    raise UserInputError(f"module {path} holds no LoRA adapter {name!r}; inject it first")
                self.groups[group].append(layer)
        self.current: tuple[float, float] | None = None
        if mechanism not in MECHANISMS:
            raise UserInputError(f"unknown ACFG mechanism {mechanism!r}; choose from {', '.join(MECHANISMS)}")
        self.mechanism = mechanism
        self._wrappers: list[RowSplitLayer] = []
        self._unwrap: Callable[[], None] | None = None
        if mechanism == "merged":
            self._wrappers, self._unwrap = wrap_row_split(unet, [*content, *style], name)

    def close(self) -> None:
        """Put the peft layers back in place of the row-split wrappers ("merged"); safe to call twice."""
        if self._unwrap is not None:
            self._unwrap()
            self._unwrap, self._wrappers = None, []

    def set_weights(self, omega_c: float, omega_s: float) -> None:
        if self.current == (omega_c, omega_s):
            return  # most steps of a window schedule repeat the previous weights
        for layer in self.groups["content"]:
            layer.set_scale(self.name, float(omega_c))
        for layer in self.groups["style"]:
            layer.set_scale(self.name, float(omega_s))
        self.current = (omega_c, omega_s)

    @contextlib.contextmanager
    def per_sample(self, use_adapter: Sequence[bool]) -> Iterator[None]:
        """Row k of every forward inside runs with the adapter iff use_adapter[k], else on the base weights."""
        split = contiguous_split(use_adapter) if self._wrappers else None
        if split is not None:  # CFG's [uncond | cond] rows: two half-batch passes on merged weights
            set_split(self._wrappers, split)
            try:
                yield
            finally:
                set_split(self._wrappers, None)
            return
        names = [self.name if on else BASE for on in use_adapter]
        with per_sample_adapters(self.unet, names):
            yield


@dataclass
class AsymmetricCFG:
    """The ACFG guidance policy (a `Guidance`): one batched forward of 2B rows per step.

    scale: g >= 0. adapter: the `BranchAdapter` of the content/style LoRA. schedule: the ω schedule.
    symmetric: ablation, LoRA on the unconditional rows too (standard CFG with LoRAs).
    record: optional dict; at step 0 it gets `omega` = [(ω_c, ω_s) per step] for the run's record.
    """

    scale: float
    adapter: BranchAdapter
    schedule: AcfgSchedule = field(default_factory=AcfgSchedule)
    symmetric: bool = False
    record: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._cfg = ClassifierFreeGuidance(self.scale, branch_context=self._branches)

    def __call__(
        self,
        model_fn: ModelFn,
        latents: Tensor,
        t: Tensor,
        step_index: int,
        num_steps: int,
        cond: GuidanceCond,
    ) -> Tensor:
        if step_index == 0 and self.record is not None:
            self.record["omega"] = [list(w) for w in self.schedule.table(num_steps)]
        return self._cfg(model_fn, latents, t, step_index, num_steps, cond)

    @contextlib.contextmanager
    def _branches(self, step_index: int, num_steps: int, labels: Sequence[str]) -> Iterator[None]:
        omega_c, omega_s = self.schedule.weights(step_index, num_steps)
        self.adapter.set_weights(omega_c, omega_s)
        active = omega_c != 0 or omega_s != 0  # both 0: the base forward, no LoRA work at all
        use = [active and (self.symmetric or label != UNCOND) for label in labels]
        with self.adapter.per_sample(use):
            yield

    def __repr__(self) -> str:
        s = self.schedule
        return (
            f"AsymmetricCFG(scale={self.scale}, schedule={s.kind}, lambda_c={s.lambda_c}, lambda_s={s.lambda_s}, "
            f"symmetric={self.symmetric})"
        )
