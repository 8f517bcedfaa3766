"""Two weight sets in one batched forward, the fast way: rows [0, k) on the base W, rows [k, N) on W + ΔW.

Why not peft's mixed-batch forward (`inject.per_sample_adapters`): at every LoRA layer and step it gathers each
adapter's rows by index, runs A then B on them and scatters the result back, in Python. On the built-in world model
on CPU that made CRAFT's asymmetric CFG cost 1.4-1.5x plain CFG (benchmarks/fusion_speed.py, acfg_speed.py).
CFG's rows are contiguous ([uncond | cond], `guidance.cfg`), and ω(i) changes only a few times a run under the
window schedule, so here each wrapped layer merges W_cond = W + ΔW·scale once per change of its peft scale and
runs two plain half-batch matmuls (convolutions): the FLOPs of the base layer alone, no LoRA work per step. The
result equals the peft path up to float rounding (a merged weight sums in another order), not bit for bit.

    wrappers, restore = wrap_row_split(unet, paths, "craft")
    set_split(wrappers, k)      # inside: rows < k base, rows >= k with the adapter; None: the plain peft layer
    restore()                   # puts the peft layers back where they were
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from lorafuse.errors import UserInputError


class RowSplitLayer(nn.Module):
    """Wraps one peft LoRA layer (Linear or Conv2d base). `split` None: exactly the peft layer's forward."""

    def __init__(self, layer: LoraLayer, adapter: str) -> None:
        super().__init__()
        base = layer.get_base_layer()
        if not isinstance(base, nn.Linear | nn.Conv2d):
            raise UserInputError(
                f"row split supports Linear and Conv2d LoRA layers, not {type(base).__name__}"
            )
        if adapter in getattr(layer, "lora_variant", {}) or layer.use_dora.get(adapter, False):
            raise UserInputError(
                f"row split cannot merge adapter {adapter!r}: it is a DoRA / variant adapter"
            )
        self.layer, self.adapter = layer, adapter
        self.split: int | None = None
        self._merged: tuple[float, Tensor] | None = None  # (the scale it was merged at, W + ΔW·scale)
        self._stacked: Tensor | None = None  # Linear: (2, D, O) = [W^T, (W + ΔW)^T] for equal halves
        # plain references outside nn.Module's registry: this forward runs ~100 times a step, and Module's
        # __getattr__ and peft's get_base_layer() were a measurable part of its cost
        run = F.linear if isinstance(base, nn.Linear) else base._conv_forward
        self.__dict__["_fast"] = (layer, base, layer.scaling, run)

    def _cond_weight(self) -> Tensor | None:
        """W + ΔW at the adapter's current scale, cached; None when the scale is 0 (W itself)."""
        layer, base, scaling, _ = self._fast
        scale = float(scaling[self.adapter])
        if scale == 0:
            return None
        merged = self._merged
        if merged is None or merged[0] != scale:
            with torch.no_grad():
                delta = layer.get_delta_weight(self.adapter)  # B @ A · scaling, shaped as the base weight
                merged = self._merged = (scale, base.weight + delta.to(base.weight.dtype))
                self._stacked = None
        return merged[1]

    def _halves_linear(self, x: Tensor, weight: Tensor) -> Tensor:
        """Equal halves through a Linear as ONE batched matmul: (2, k·L, D) @ (2, D, O) = [x_u W^T | x_c W_c^T].
        One kernel call instead of two matmuls and a concatenation: per call overhead is most of a small
        layer's cost on CPU."""
        base = self._fast[1]
        if self._stacked is None:
            self._stacked = torch.stack([base.weight.T, weight.T])  # (2, D, O)
        x2 = x.reshape(2, -1, x.shape[-1])  # (N, ..., D) -> (2, N/2·..., D)
        # baddbmm folds the bias into the same call (bmm then + bias measured ~15 % slower on small layers)
        out = (
            torch.bmm(x2, self._stacked) if base.bias is None else torch.baddbmm(base.bias, x2, self._stacked)
        )
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        layer, base, _, run = self._fast
        k = self.split
        if k is None:
            return layer(x, *args, **kwargs)
        if args or kwargs:
            raise RuntimeError(
                f"row split got extra forward arguments {list(kwargs)}; use per_sample_adapters"
            )
        weight = self._cond_weight()
        if weight is None or k >= len(x):  # no LoRA rows, or a zero ΔW: the base for all rows
            return run(x, base.weight, base.bias)
        if k <= 0:
            return run(x, weight, base.bias)
        if 2 * k == len(x) and run is F.linear:  # CFG's equal halves
            return self._halves_linear(x, weight)
        # (N, ...) -> (k, ...) on W and (N - k, ...) on W + ΔW, concatenated back to (N, ...)
        return torch.cat([run(x[:k], base.weight, base.bias), run(x[k:], weight, base.bias)])


def wrap_row_split(
    root: nn.Module, paths: Sequence[str], adapter: str
) -> tuple[list[RowSplitLayer], Callable]:
    """Replace each peft layer at `paths` (inside `root`) by a `RowSplitLayer`; returns them and an undo."""
    wrappers: list[RowSplitLayer] = []
    placed: list[tuple[nn.Module, str, LoraLayer]] = []

    def restore() -> None:
        while placed:
            parent, child, layer = placed.pop()
            setattr(parent, child, layer)

    try:
        for path in paths:
            layer = root.get_submodule(path)
            if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
                raise UserInputError(f"module {path} holds no LoRA adapter {adapter!r}; inject it first")
            parent_path, _, child = path.rpartition(".")
            parent = root.get_submodule(parent_path) if parent_path else root
            wrapper = RowSplitLayer(layer, adapter)
            setattr(parent, child, wrapper)
            placed.append((parent, child, layer))
            wrappers.append(wrapper)
    except BaseException:
        restore()
        raise
    return wrappers, restore


def contiguous_split(use_adapter: Sequence[bool]) -> int | None:
    """k when use_adapter is k False then only True (rows k.. take the adapter), else None."""
    k = sum(1 for u in use_adapter if not u)
    return k if all(not u for u in use_adapter[:k]) and all(use_adapter[k:]) else None


def set_split(wrappers: Sequence[RowSplitLayer], k: int | None) -> None:
    for w in wrappers:
        w.__dict__["split"] = k  # twice a step per layer: skip nn.Module.__setattr__'s parameter checks
