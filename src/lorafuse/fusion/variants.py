"""Per-layer switching between LoRAs at run time: the mechanism K-LoRA, LoRA Switch and LoRA Composite share.

Each switched layer l has variants v = 0 … N-1 (variant v applies `w_v ΔW_v,l`; v = 0 is content, 1 is style)
and -1, the base weight. `select(l, v)` picks one, `select_all(v)` picks v everywhere. Two mechanisms:

- "swap" (default): every variant is precomputed once as a fused weight `W_l + w_v ΔW_v,l`, and a switch is a
  pointer assignment (`weight.data = ...`), so sampling runs at the base model's speed. Costs one extra copy of
  each switched weight per variant with a non-zero weight (the original is never modified: close() puts the
  original tensor back, so the base is restored bit for bit).
- "adapter": the LoRAs are peft adapters and a switch sets a layer's active adapter. Memory is the LoRA factors
  only; every forward pays the low-rank product of the active adapter (B (A x)), like unmerged LoRA inference.
benchmarks/fusion_speed.py measures both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

import torch

from lorafuse.errors import LorafuseError
from lorafuse.fusion.common import raw_delta, split_state
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import ModuleRef, components_of

Mechanism = Literal["swap", "adapter"]
MECHANISMS = ("swap", "adapter")
BASE = -1


class LayerVariants(ABC):
    """Switches `layers[l]` between variants; starts (and ends, after close) on the base weights."""

    def __init__(self, layers: Sequence[ModuleRef]) -> None:
        self.layers = list(layers)
        self.current = [BASE] * len(self.layers)

    def select(self, index: int, variant: int) -> None:
        if self.current[index] != variant:
            self._apply(index, variant)
            self.current[index] = variant

    def select_all(self, variant: int) -> None:
        for index in range(len(self.layers)):
            self.select(index, variant)

    @abstractmethod
    def _apply(self, index: int, variant: int) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Back to the base weights exactly and release what was built. Safe to call twice."""


def _module(pipe: object, ref: ModuleRef) -> torch.nn.Module:
    return components_of(pipe)[ref.component].get_submodule(ref.path)


class FusedSwap(LayerVariants):
    """Mechanism "swap": precomputed `W + w_v ΔW_v` per layer and variant, switched by pointer assignment."""

    def __init__(
        self,
        pipe: object,
        layers: Sequence[ModuleRef],
        sources: Sequence[tuple[dict[ModuleRef, LoraModule], float]],
        *,
        scaled: bool = True,
    ) -> None:
        super().__init__(layers)
        self._params: list[torch.nn.Parameter] = []
        self._originals: list[torch.Tensor] = []
        self._fused: list[list[torch.Tensor]] = []
        for ref in self.layers:
            module = _module(pipe, ref)
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            param = base.weight
            w0 = param.data
            fused = []
            for modules, weight in sources:
                lora = modules.get(ref)
                if lora is None or weight == 0:
                    fused.append(w0)  # the same tensor: a variant without an update is the base, exactly
                    continue
                # the same expression as lora.merge.fuse_into, so a swapped-in variant equals a fused LoRA
                delta = raw_delta(lora, tuple(w0.shape), scaled).to(w0.device)
                new = (w0.float() + weight * delta).to(w0.dtype)
                if not torch.isfinite(new).all():
                    raise LorafuseError(
                        f"{ref.component}.{ref.path}: W + {weight}·ΔW is not finite (NaN/inf); the LoRA is broken "
                        "or its weight too large"
                    )
                fused.append(new)
            self._params.append(param)
            self._originals.append(w0)
            self._fused.append(fused)

    def _apply(self, index: int, variant: int) -> None:
        tensors = self._fused[index]
        self._params[index].data = self._originals[index] if variant == BASE else tensors[variant]

    def close(self) -> None:
        for param, original in zip(self._params, self._originals, strict=True):
            param.data = original
        self.current = [BASE] * len(self.layers)
        self._fused = [[] for _ in self._fused]


class AdapterSwitch(LayerVariants):
    """Mechanism "adapter": one peft adapter per variant on the switched layers; a switch sets the active one."""

    def __init__(
        self,
        pipe: object,
        layers: Sequence[ModuleRef],
        sources: Sequence[tuple[LoraState, dict[str, ModuleRef], float]],
        names: Sequence[str],
        *,
        scaled: bool = True,
    ) -> None:
        from lorafuse.lora.inject import delete_adapter, inject_lora

        super().__init__(layers)
        self._pipe = pipe
        self._names: list[str] = []
        wanted = set(self.layers)
        try:
            for (state, refs, weight), name in zip(sources, names, strict=True):
                part = split_state(state, [k for k, ref in refs.items() if ref in wanted])
                if not scaled:  # alpha = rank: scale 1, ΔW = up @ down as the official K-LoRA code uses it
                    part.modules = {
                        k: LoraModule(m.down, m.up, None, m.delta) for k, m in part.modules.items()
                    }
                if part.modules:
                    inject_lora(pipe, part, name, weight)
                    self._names.append(name)
        except BaseException:
            for name in self._names:
                delete_adapter(pipe, name)
            raise
        self._variant_names = list(names)
        self._layers = [_module(pipe, ref) for ref in self.layers]
        for layer in self._layers:
            layer.set_adapter([], inference_mode=True)  # start on the base, as FusedSwap does

    def _apply(self, index: int, variant: int) -> None:
        active = [] if variant == BASE else [self._variant_names[variant]]
        self._layers[index].set_adapter(active, inference_mode=True)

    def close(self) -> None:
        from lorafuse.lora.inject import delete_adapter

        while self._names:
            delete_adapter(self._pipe, self._names.pop())
        self.current = [BASE] * len(self.layers)


def make_variants(
    mechanism: str,
    pipe: object,
    layers: Sequence[ModuleRef],
    sources: Sequence[tuple[LoraState, dict[str, ModuleRef], float]],
    names: Sequence[str],
    *,
    scaled: bool = True,
) -> LayerVariants:
    """sources[v] = (LoRA, its key -> module map, weight w_v); `names[v]` names the adapter (mechanism "adapter")."""
    if mechanism == "swap":
        by_ref = [({ref: state.modules[k] for k, ref in refs.items()}, w) for state, refs, w in sources]
        return FusedSwap(pipe, layers, by_ref, scaled=scaled)
    if mechanism == "adapter":
        return AdapterSwitch(pipe, layers, sources, names, scaled=scaled)
    raise ValueError(f"unknown mechanism {mechanism!r}; expected one of {MECHANISMS}")
