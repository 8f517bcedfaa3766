"""K-LoRA's choice table (docs/algorithms.md §2, §2.1), computed once per (content, style) pair.

Notation map (paper -> code), per LoRA'd attention projection l (forward order) and step i = 0 … T-1:
    ΔW_c,l, ΔW_s,l            `delta_c`, `delta_s` (float32, shaped like the base weight)
    K_l = r_c · r_s           `k[l]`
    S_c,l = Σ TopK_K(|ΔW_c,l|) `top_c[l]`;  S_s,l likewise `top_s[l]`
    Σ|ΔW_c,l|, Σ|ΔW_s,l|      `abs_c[l]`, `abs_s[l]` (for the balance factor)
    γ                         `gamma`: Σ_l abs_c / Σ_l abs_s (paper); trimmed mean of per-layer ratios (official)
    S(i) = α i/T + β          `guidance.schedules.klora_scale(i, T, alpha, beta)`, α = 1.5, β = 0.5
    choose content if S_c,l ≥ γ S(i) S_s,l  ->  `table[l, i]` is True (content) or False (style)

Nothing but S(i) depends on the step, so the whole (layer x step) table is a few vector operations; at run time
K-LoRA only looks the choice up. The official code (docs/algorithms.md §2.1) recomputes `up @ down` and a Top-K on every call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafuse.guidance.schedules import klora_scale
from lorafuse.utils.atomic import atomic_path

SELECTIONS = ("topk", "fixed", "random")


@dataclass(frozen=True)
class LayerScores:
    """The step-independent part of K-LoRA, one entry per layer (see the module docstring for the names)."""

    layers: list[str]
    k: list[int]
    top_c: list[float]
    top_s: list[float]
    abs_c: list[float]
    abs_s: list[float]
    has_c: list[bool]
    has_s: list[bool]

    def __len__(self) -> int:
        return len(self.layers)


def topk_sum(delta: torch.Tensor, k: int) -> float:
    """Σ of the k largest |ΔW| entries over the flattened matrix (k clamped to its size)."""
    flat = delta.abs().flatten()
    return float(torch.topk(flat, min(k, flat.numel())).values.sum())


def layer_scores(
    layers: Sequence[str],
    deltas_c: Sequence[torch.Tensor | None],
    deltas_s: Sequence[torch.Tensor | None],
    ranks_c: Sequence[int | None],
    ranks_s: Sequence[int | None],
    fixed_k: int = 0,
) -> LayerScores:
    """Scores of every layer. A layer only one LoRA touches scores 0 for the other, so the rule keeps the LoRA
    that has it; K then uses the present rank twice. `fixed_k` > 0 replaces K_l = r_c r_s (the paper's Fig. 8)."""
    k, top_c, top_s, abs_c, abs_s = [], [], [], [], []
    for dc, ds, rc, rs in zip(deltas_c, deltas_s, ranks_c, ranks_s, strict=True):
        rc, rs = rc or rs, rs or rc
        k_l = fixed_k or int(rc * rs)
        k.append(k_l)
        top_c.append(topk_sum(dc, k_l) if dc is not None else 0.0)
        top_s.append(topk_sum(ds, k_l) if ds is not None else 0.0)
        abs_c.append(float(dc.abs().sum()) if dc is not None else 0.0)
        abs_s.append(float(ds.abs().sum()) if ds is not None else 0.0)
    return LayerScores(
        list(layers), k, top_c, top_s, abs_c, abs_s,
        [d is not None for d in deltas_c], [d is not None for d in deltas_s],
    )  # fmt: skip


def gamma_paper(scores: LayerScores) -> float:
    """γ = Σ_l Σ|ΔW_c,l| / Σ_l Σ|ΔW_s,l| (the paper's ratio of global sums over all K-LoRA layers)."""
    return sum(scores.abs_c) / sum(scores.abs_s)


def gamma_official(scores: LayerScores) -> float:
    """The official code's γ: the mean of per-layer ratios Σ|ΔW_c,l| / Σ|ΔW_s,l|, then again without the
    ratios ≥ 3x that mean. Only layers both LoRAs touch have a ratio (the official code requires all)."""
    ratios = [
        c / s for c, s, hc, hs in zip(scores.abs_c, scores.abs_s, scores.has_c, scores.has_s, strict=True)
        if hc and hs and s > 0
    ]  # fmt: skip
    if not ratios:
        raise ValueError("no attention layer has both a content and a style update")
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return sum(kept) / len(kept) if kept else math.inf


def schedule_table(
    scores: LayerScores,
    num_steps: int,
    *,
    gamma: float,
    alpha: float = 1.5,
    beta: float = 0.5,
    selection: str = "topk",
    random_p: float = 1 / 3,
    seed: int = 0,
) -> torch.Tensor:
    """(L, T) bool, True = content LoRA at layer l, step i.

    selection "topk": S_c,l ≥ γ S(i) S_s,l (paper; docs/algorithms.md §2). "fixed": the paper's ablation as it states it, content
    when the scale alone says so, S'(i) = γ S(i) ≥ 1, the same for every layer. "random": content with
    probability `random_p` (1/3 in the paper), independently per layer and step, from a generator seeded `seed`.
    """
    n = len(scores)
    if selection == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.rand((n, num_steps), generator=g, dtype=torch.float64) < random_p
    # float64, one product per entry, in the order the rule is written: equals the same rule in Python floats
    s_prime = torch.tensor([gamma * klora_scale(i, num_steps, alpha, beta) for i in range(num_steps)],
                           dtype=torch.float64)  # fmt: skip
    if selection == "fixed":
        return (s_prime >= 1.0).expand(n, num_steps).clone()
    if selection != "topk":
        raise ValueError(f"unknown selection {selection!r}; expected one of {SELECTIONS}")
    top_c = torch.tensor(scores.top_c, dtype=torch.float64)[:, None]  # (L, 1)
    top_s = torch.tensor(scores.top_s, dtype=torch.float64)[:, None]
    return top_c >= s_prime[None, :] * top_s  # (L, 1) vs (1, T) * (L, 1) -> (L, T)


def official_scale(count: int, period: int, alpha: float, beta: float) -> float:
    """The official "s*" scale of call number `count`: u = (count mod P) / P, S = (α u + β) mod α."""
    # the official arithmetic order: alpha * (count % P) / P + beta, then the "s*" wrap
    return (alpha * (count % period) / period + beta) % alpha


def official_choice(top_c_over_gamma: float, top_s: float, scale: float) -> bool:
    """Official decision: content iff (S_c / γ) / (S_s · S) > 1, strictly. A zero denominator behaves as the
    official tensors do: x/0 = inf for x > 0 (content) and 0/0 = nan (style)."""
    denominator = top_s * scale
    if denominator == 0:
        return top_c_over_gamma > 0
    return top_c_over_gamma / denominator > 1


def official_table(
    scores: LayerScores,
    num_steps: int,
    *,
    gamma: float,
    alpha: float,
    beta: float,
    period: int,
    start: int = 0,
) -> torch.Tensor:
    """(L, T) choices the official per-call counter makes when each step is one UNet forward that calls the
    layers in forward order and the counter stood at `start` (0: a fresh plan's first image)."""
    n = len(scores)
    table = torch.zeros((n, num_steps), dtype=torch.bool)
    for i in range(num_steps):
        for layer in range(n):
            count = start + i * n + layer + 1  # the official code counts before it chooses
            scale = official_scale(count, period, alpha, beta)
            table[layer, i] = official_choice(scores.top_c[layer] / gamma, scores.top_s[layer], scale)
    return table


HEATMAP_DPI = 100


def _heatmap_inches(layers: int, steps: int) -> tuple[float, float]:
    """The heatmap's figure size: a column per step and a row per layer, within readable bounds."""
    return min(max(5.0, 2 + 0.25 * steps), 14), min(max(3.0, 1.5 + 0.06 * layers), 12)


def heatmap_pixels(layers: int, steps: int) -> tuple[int, int]:
    """(width, height) of `schedule_heatmap`'s PNG for a table of layers x steps (an RGBA image): for the disk
    estimate of `lorafuse fuse` before anything samples."""
    w, h = _heatmap_inches(layers, steps)
    return round(w * HEATMAP_DPI), round(h * HEATMAP_DPI)


def schedule_heatmap(
    table: torch.Tensor, path: str | Path, *, layers: Sequence[str] | None = None, title: str | None = None
) -> Path:
    """A PNG of the choices, layers (rows, forward order) x steps, content blue and style green, like the
    paper's Figure 6. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n, steps = table.shape
    colors = ("#3cb371", "#1f5fbf")  # style (False), content (True)
    fig, ax = plt.subplots(figsize=_heatmap_inches(n, steps), dpi=HEATMAP_DPI)
    ax.imshow(table.to(torch.uint8).numpy(), aspect="auto", interpolation="nearest",
              cmap=ListedColormap(colors), vmin=0, vmax=1)  # fmt: skip
    ax.set_xlabel("denoising step i (0 = noisiest)")
    ax.set_ylabel("attention projection (forward order)")
    if layers is not None and n <= 40:
        ax.set_yticks(range(n), [name.split(".", 1)[-1] for name in layers], fontsize=5)
    frac = float(table.float().mean()) if table.numel() else 0.0
    ax.set_title(title or f"K-LoRA choices: content {frac:.0%} of (layer, step) pairs", fontsize=9)
    ax.legend(handles=[Patch(color=colors[1], label="content"), Patch(color=colors[0], label="style")],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)  # fmt: skip
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def record_heatmap(plan_record: dict, path: str | Path, *, title: str | None = None) -> Path | None:
    """`schedule_heatmap` of the schedule a K-LoRA plan put in its record (`record["plan"]` of `lorafuse.fuse`),
    or None when the record has none (every other method, or a K-LoRA mode without a precomputed table)."""
    schedule = (plan_record or {}).get("schedule")
    if not schedule or "content" not in schedule:
        return None
    table = torch.tensor(schedule["content"], dtype=torch.bool)
    return schedule_heatmap(table, path, layers=schedule.get("layers"), title=title)
