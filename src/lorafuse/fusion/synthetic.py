"""Random LoRAs (public API: for tests, benchmarks, and users checking a pipeline or a method without training
anything): non-zero up AND down (never the zero-B init of training), so every
module really changes the output and an equality test cannot pass by accident."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorafuse.fusion.common import is_attention_projection
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import ModuleRef, base_modules


def random_lora(
    base: object,
    *,
    seed: int = 0,
    rank: int | tuple[int, ...] = 4,
    scale: float = 0.1,
    alpha: float | None = None,
    keep: Callable[[ModuleRef], bool] = is_attention_projection,
) -> LoraState:
    """A LoRA on the modules of `base` that `keep` accepts (default: the UNet's attention projections).

    rank: one rank, or a tuple cycled over the modules (mixed ranks make K_l = r_c r_s differ per layer).
    Factors ~ N(0, 1) · scale; alpha None means alpha = rank (scale 1).
    """
    ranks = (rank,) if isinstance(rank, int) else tuple(rank)
    g = torch.Generator().manual_seed(seed)
    modules: dict[str, LoraModule] = {}
    selected = [(k, r) for k, r in sorted(base_modules(base).modules.items()) if keep(r)]
    for i, (key, ref) in enumerate(selected):
        r = ranks[i % len(ranks)]
        out_f, in_f, *kernel = ref.shape
        down = torch.randn((r, in_f, *kernel), generator=g) * scale
        up = torch.randn((out_f, r, *([1, 1] if kernel else [])), generator=g) * scale
        modules[key] = LoraModule(down=down, up=up, alpha=alpha)
    return LoraState(modules=modules, source_path=None)
