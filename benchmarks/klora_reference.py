"""A slow, obvious K-LoRA: everything recomputed at every step (paper rule) or every call (official rule).

This is the reference the fast implementation (`fusion/klora.py`, a table computed once) is tested against, and
the "faithful per-step recompute" that fusion_speed.py times beside it (it lives here, beside the benchmarks,
since the package never runs it). It follows the official code's
structure: at each decision, ΔW = s B A from the factors, |ΔW|, a sort for the Top-K sums, γ from all layers,
the scale, the comparison, then W + w ΔW written into the layer. It shares no code with `klora.py` beyond
`klora_scale` (the formula S(i) = α i/T + β itself). It only handles the attention projections, so use it with
LoRAs that have nothing else (tests and benchmarks make such LoRAs).

Notation: `delta_c` is ΔW_c,l, `k` is K_l = r_c r_s, `gamma` is γ, `scale` is S(i) or the official S(u).
"""

from __future__ import annotations

from typing import Any

import torch

from lorafuse.families import family_of
from lorafuse.fusion.common import is_attention_projection
from lorafuse.guidance.schedules import klora_scale
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import components_of
from lorafuse.lora.validate import validate_lora


def _delta(module: LoraModule | None, shape: torch.Size, scaled: bool) -> torch.Tensor | None:
    if module is None:
        return None
    up, down = module.up.float().flatten(1), module.down.float()
    delta = up @ down
    if scaled:
        delta = module.scale * delta
    return delta.reshape(shape)


def _top_sum(delta: torch.Tensor | None, k: int) -> float:
    if delta is None:
        return 0.0
    ordered = torch.sort(delta.abs().flatten(), descending=True).values
    return float(ordered[:k].sum())


class NaiveKLoraHook:
    """A `StepHook` that recomputes K-LoRA's choice from scratch at every step (or call, `mode="official"`)."""

    def __init__(self, pipe: Any, content: LoraState, style: LoraState, *, content_weight: float = 1.0,
                 style_weight: float = 1.0, mode: str = "paper", alpha: float = 1.5, beta: float | None = None,
                 period: int = 0, k: int = 0) -> None:  # fmt: skip
        family = family_of(pipe)
        arch, unet = family.name, components_of(pipe)[family.denoiser_component]
        found: dict[str, dict[str, LoraModule]] = {}
        for role, state in (("c", content), ("s", style)):
            for key, ref in validate_lora(state, pipe, arch=arch).targets.items():
                if is_attention_projection(ref):
                    found.setdefault(ref.path, {})[role] = state.modules[key]
        self.paths = [p for p, _ in unet.named_modules() if p in found]
        self.loras = [found[p] for p in self.paths]
        self.params = [unet.get_submodule(p).weight for p in self.paths]
        self.originals = [p.data for p in self.params]
        self.weights = {"c": content_weight, "s": style_weight}
        self.mode, self.alpha, self.k = mode, alpha, k
        self.beta = beta if beta is not None else (0.85 * alpha if mode == "official" else 0.5)
        self.period, self.count = period, 0
        self.choices: list[list[str]] = []  # per decision round: "c" / "s" per layer (paper mode)
        self._handles: list[Any] = []
        if mode == "official":
            self.gamma = self._official_gamma()

    def _deltas(self, index: int) -> dict[str, torch.Tensor | None]:
        scaled = self.mode != "official"
        shape = self.originals[index].shape
        return {role: _delta(self.loras[index].get(role), shape, scaled) for role in ("c", "s")}

    def _k(self, index: int) -> int:
        ranks = [m.rank for m in self.loras[index].values()]
        return self.k or ranks[0] * ranks[-1]

    def _apply(self, index: int, role: str, delta: torch.Tensor | None) -> None:
        w0, weight = self.originals[index], self.weights[role]
        if delta is None:
            self.params[index].data = w0
        else:
            self.params[index].data = (w0.float() + weight * delta).to(w0.dtype)

    def _official_gamma(self) -> float:
        ratios = []
        for index in range(len(self.paths)):
            d = self._deltas(index)
            if d["c"] is not None and d["s"] is not None:
                ratios.append(float(d["c"].abs().sum()) / float(d["s"].abs().sum()))
        mean = sum(ratios) / len(ratios)
        kept = [r for r in ratios if r < 3 * mean]
        return sum(kept) / len(kept)

    def before_step(self, step_index: int, num_steps: int, unet: torch.nn.Module) -> None:
        if self.mode == "official":
            if not self._handles:
                self.period = self.period or len(self.paths) * num_steps
                self._handles = [
                    unet.get_submodule(p).register_forward_pre_hook(lambda m, a, i=i: self._official_call(i))
                    for i, p in enumerate(self.paths)
                ]
            return
        deltas = [self._deltas(i) for i in range(len(self.paths))]
        total_c = sum(float(d["c"].abs().sum()) for d in deltas if d["c"] is not None)
        total_s = sum(float(d["s"].abs().sum()) for d in deltas if d["s"] is not None)
        gamma = total_c / total_s
        scale = klora_scale(step_index, num_steps, self.alpha, self.beta)
        row = []
        for index, d in enumerate(deltas):
            k = self._k(index)
            content = _top_sum(d["c"], k) >= (gamma * scale) * _top_sum(d["s"], k)
            role = "c" if content else "s"
            self._apply(index, role, d[role])
            row.append(role)
        self.choices.append(row)

    def _official_call(self, index: int) -> None:
        self.count += 1
        d = self._deltas(index)
        k = self._k(index)
        scale = (self.alpha * (self.count % self.period) / self.period + self.beta) % self.alpha
        top_c = torch.tensor(_top_sum(d["c"], k), dtype=torch.float64) / self.gamma
        top_s = torch.tensor(_top_sum(d["s"], k), dtype=torch.float64) * scale
        # tensors, as in the official code: x/0 is inf (content), 0/0 is nan (style)
        role = "c" if bool(top_c / top_s > 1) else "s"
        self._apply(index, role, d[role])

    def after_sampling(self, unet: torch.nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for param, original in zip(self.params, self.originals, strict=True):
            param.data = original
