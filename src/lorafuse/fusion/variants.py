"""Per-layer switching between LoRAs at run time: the mechanism K-LoRA, LoRA Switch and LoRA Composite share.

Each switched layer l has variants v = 0 … N-1 (variant v applies `w_v ΔW_v,l`; v = 0 is content, 1 is style)
and -1, the base weight. `select(l, v)` picks one, `select_all(v)` picks v everywhere. Two mechanisms:

- "swap" (default): every variant is precomputed once as a fused weight `W_l + w_v ΔW_v,l`, and a switch is a
  pointer assignment (`weight.data = ...`), so sampling runs at the base model's speed. Costs one extra copy of
  each switched weight per variant with a non-zero weight (the original is never modified: close() puts the
  original tensor back, so the base is restored bit for bit).
- "adapter": the LoRAs are peft adapters and a switch sets a layer's active adapter. Memory is the LoRA factors
  only; every forward pays the low-rank product of the active adapter (B (A x)), like unmerged LoRA inference.
- "inplace": one weight tensor per layer, rewritten in place (`W.copy_(W0 + w ΔW)` from the LoRA factors kept
  on the device); the original W0 is kept on the CPU and copied back before a layer changes variant and at
  close(), so every variant equals "swap"'s fused weight bit for bit and the base is restored bit for bit. No
  extra weight copy on the device (at FLUX.1 size "swap" needs one per variant: more than a 24 GB card holds);
  a switch costs one ΔW product and, between two LoRAs, one host-to-device copy of the layer.
- "auto" (the default): "swap" when its extra copies fit in half the free memory of the weights' device
  (`accelerate.utils.get_max_memory`), else "inplace". `mechanism_bytes` gives each mechanism's extra bytes.
benchmarks/fusion_speed.py and benchmarks/realsize.py measure them.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

import torch

from lorafuse.errors import LorafuseError
from lorafuse.fusion.common import raw_delta, split_state
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import ModuleRef, components_of

Mechanism = Literal["auto", "swap", "adapter", "inplace"]
MECHANISMS = ("auto", "swap", "adapter", "inplace")
BASE = -1
AUTO_FRACTION = 0.5  # "auto" uses "swap" only if its copies take at most this share of the free memory


class LayerVariants(ABC):
    """Switches `layers[l]` between variants; starts (and ends, after close) on the base weights."""

    mechanism = ""  # set by make_variants

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


def _base_weight(pipe: object, ref: ModuleRef) -> torch.nn.Parameter:
    module = _module(pipe, ref)
    return (module.get_base_layer() if hasattr(module, "get_base_layer") else module).weight


def _fused_weight(ref: ModuleRef, w0: torch.Tensor, lora: LoraModule, weight: float, scaled: bool) -> torch.Tensor:
    """`W0 + weight·ΔW` in W0's dtype, by the same expression as lora.merge.fuse_into (so a switched-in variant
    equals a fused LoRA); refused when not finite."""
    delta = raw_delta(lora, tuple(w0.shape), scaled).to(w0.device)
    new = (w0.float() + weight * delta).to(w0.dtype)
    if not torch.isfinite(new).all():
        raise LorafuseError(
            f"{ref.component}.{ref.path}: W + {weight}·ΔW is not finite (NaN/inf); the LoRA is broken or its weight "
            "too large"
        )
    return new


class _WeightVariants(LayerVariants):
    """The mechanisms that put each variant into the layer's own weight ("swap", "inplace"): per layer, the
    parameter, its original tensor (`_keep`) and one entry per variant (`_variant`, or `_no_update` where the
    variant leaves the layer as it is)."""

    def __init__(
        self,
        pipe: object,
        layers: Sequence[ModuleRef],
        sources: Sequence[tuple[dict[ModuleRef, LoraModule], float]],
        *,
        scaled: bool = True,
    ) -> None:
        super().__init__(layers)
        self._scaled = scaled
        self._params: list[torch.nn.Parameter] = []
        self._originals: list[torch.Tensor] = []
        self._variants: list[list] = []
        for ref in self.layers:
            param = _base_weight(pipe, ref)
            w0 = param.data
            entries = []
            for modules, weight in sources:
                lora = modules.get(ref)
                entries.append(self._no_update(w0) if lora is None or weight == 0 else self._variant(ref, w0, lora, weight))
            self._params.append(param)
            self._originals.append(self._keep(w0))
            self._variants.append(entries)

    @abstractmethod
    def _variant(self, ref: ModuleRef, w0: torch.Tensor, lora: LoraModule, weight: float) -> object: ...

    @abstractmethod
    def _no_update(self, w0: torch.Tensor) -> object: ...

    @abstractmethod
    def _keep(self, w0: torch.Tensor) -> torch.Tensor: ...


class FusedSwap(_WeightVariants):
    """Mechanism "swap": precomputed `W + w_v ΔW_v` per layer and variant, switched by pointer assignment."""

    def _variant(self, ref: ModuleRef, w0: torch.Tensor, lora: LoraModule, weight: float) -> torch.Tensor:
        return _fused_weight(ref, w0, lora, weight, self._scaled)

    def _no_update(self, w0: torch.Tensor) -> torch.Tensor:
        return w0  # the same tensor: a variant without an update is the base, exactly

    def _keep(self, w0: torch.Tensor) -> torch.Tensor:
        return w0

    def _apply(self, index: int, variant: int) -> None:
        tensors = self._variants[index]
        self._params[index].data = self._originals[index] if variant == BASE else tensors[variant]

    def close(self) -> None:
        for param, original in zip(self._params, self._originals, strict=True):
            param.data = original
        self.current = [BASE] * len(self.layers)
        self._variants = [[] for _ in self._variants]


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


class InPlaceSwitch(_WeightVariants):
    """Mechanism "inplace": `W.copy_(W0 + w_v ΔW_v)` in the layer's own tensor; W0 kept on the CPU."""

    def _variant(self, ref: ModuleRef, w0: torch.Tensor, lora: LoraModule, weight: float
                 ) -> tuple[LoraModule, float]:  # fmt: skip
        lora = _on(lora, w0.device)  # the factors (r (in + out) numbers) live on the device
        _fused_weight(ref, w0, lora, weight, self._scaled)  # checked once here, applied per switch later
        return lora, weight

    def _no_update(self, w0: torch.Tensor) -> tuple[None, float]:
        return None, 0.0

    def _keep(self, w0: torch.Tensor) -> torch.Tensor:
        return w0.detach().to("cpu", copy=True)

    def _apply(self, index: int, variant: int) -> None:
        w = self._params[index].data
        if self.current[index] != BASE:
            w.copy_(self._originals[index])  # back to W0 exactly before another variant
        if variant == BASE:
            return
        lora, weight = self._variants[index][variant]
        if lora is not None:
            # the same expression as FusedSwap (and lora.merge.fuse_into): equal weights, bit for bit
            w.copy_((w.float() + weight * raw_delta(lora, tuple(w.shape), self._scaled)).to(w.dtype))

    def close(self) -> None:
        for index, (param, original) in enumerate(zip(self._params, self._originals, strict=True)):
            if self.current[index] != BASE:
                param.data.copy_(original)
        self.current = [BASE] * len(self.layers)


def _on(lora: LoraModule, device: torch.device) -> LoraModule:
    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return dataclasses.replace(lora, down=move(lora.down), up=move(lora.up), delta=move(lora.delta))


def mechanism_bytes(
    shapes: Sequence[tuple[int, ...]], ranks: Sequence[Sequence[int]], weight_bytes: int, factor_bytes: int = 4
) -> dict[str, dict[str, int]]:
    """Extra bytes each mechanism needs beyond the base model, on the device and on the host.

    shapes[l]: the weight shape of switched layer l; ranks[l]: the rank of each variant there (0: no update);
    weight_bytes: bytes per weight element (2 for bf16); factor_bytes: per LoRA-factor element (float32).
    swap keeps one fused copy per variant; adapter and inplace keep the factors; inplace also holds the
    originals on the host and, transiently, one float32 ΔW of the largest layer."""
    numel = [math.prod(s) for s in shapes]
    factors = sum(r * (s[0] + math.prod(s[1:])) for s, rs in zip(shapes, ranks, strict=True) for r in rs)
    fused = sum(n for n, rs in zip(numel, ranks, strict=True) for r in rs if r)
    largest = max(numel, default=0)
    return {
        "swap": {"device": fused * weight_bytes, "host": 0},
        "adapter": {"device": factors * factor_bytes, "host": 0},
        "inplace": {"device": factors * factor_bytes + largest * 4, "host": sum(numel) * weight_bytes},
    }


def choose_mechanism(layers: Sequence[ModuleRef], sources: Sequence[tuple[dict, float]], device: torch.device
                     ) -> str:  # fmt: skip
    """"swap" if its fused copies fit in AUTO_FRACTION of the device's free memory, else "inplace"."""
    from accelerate.utils import get_max_memory

    n_bytes = torch.finfo(torch.float32).bits // 8  # a bound: fused copies are at most float32
    need = sum(math.prod(ref.shape) * n_bytes for ref in layers for modules, w in sources if w and ref in modules)
    key = device.index if device.type == "cuda" else "cpu"
    free = get_max_memory().get(key if key is not None else 0, 0)
    return "swap" if need <= AUTO_FRACTION * free else "inplace"


def make_variants(
    mechanism: str,
    pipe: object,
    layers: Sequence[ModuleRef],
    sources: Sequence[tuple[LoraState, dict[str, ModuleRef], float]],
    names: Sequence[str],
    *,
    scaled: bool = True,
) -> LayerVariants:
    """sources[v] = (LoRA, its key -> module map, weight w_v); `names[v]` names the adapter (mechanism "adapter").
    The result's `mechanism` is the one used ("auto" resolved)."""
    by_ref = [({ref: state.modules[k] for k, ref in refs.items()}, w) for state, refs, w in sources]
    if mechanism == "auto":
        device = _module(pipe, layers[0]).weight.device if layers else torch.device("cpu")
        mechanism = choose_mechanism(layers, by_ref, device)
    variants: LayerVariants
    if mechanism == "swap":
        variants = FusedSwap(pipe, layers, by_ref, scaled=scaled)
    elif mechanism == "inplace":
        variants = InPlaceSwitch(pipe, layers, by_ref, scaled=scaled)
    elif mechanism == "adapter":
        variants = AdapterSwitch(pipe, layers, sources, names, scaled=scaled)
    else:
        raise ValueError(f"unknown mechanism {mechanism!r}; expected one of {MECHANISMS}")
    variants.mechanism = mechanism
    return variants

