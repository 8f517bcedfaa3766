"""Paired differences between two methods that saw the same inputs: the right test when every method runs on the
same (pair, seed) cells, since most of the spread between cells (an easy individual, a weak style LoRA) is shared.

The unit is the pair, not the image: the images of one pair share its two LoRAs, so they are not independent.
Per pair, d_p = mean over seeds of (score_method − score_baseline) on the same seed; the interval is over the d_p:
- "t": d̄ ± t_{0.975, n−1} s_d / √n, the paired t-interval (Student 1908; e.g. Wasserman, *All of Statistics*,
  §10.3 for the paired design), assuming the d_p are roughly normal;
- "bootstrap": the percentile interval of 10 000 resampled means of the d_p (the paired bootstrap: pairs are
  resampled with both methods' scores together; Efron & Tibshirani 1993, ch. 13), without normality.
Cells where either method has no score (a skipped method, an undefined cross-influence) are left out of that pair;
pairs with no common cell are left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lorafuse.errors import UserInputError
from lorafuse.eval.metrics import confidence_interval

INTERVALS = ("t", "bootstrap")


@dataclass(frozen=True)
class PairedDifference:
    """Mean paired difference (method − baseline) with its 95 % interval over `n` pairs; `per_pair` the d_p."""

    method: str
    baseline: str
    metric: str
    mean: float
    low: float
    high: float
    n: int
    interval: str
    per_pair: dict[str, float] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """'better' / 'worse' when the interval excludes 0, else 'no difference shown'."""
        if self.n < 2 or math.isnan(self.low):
            return "too few pairs"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "no difference shown"

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


def per_pair_differences(rows: Sequence[dict[str, Any]], method: str, baseline: str, metric: str,
                         *, label: str = "method", unit: str = "pair", cell: str = "seed") -> dict[str, float]:  # fmt: skip
    """{pair: mean over its cells of (method − baseline)}, cells matched on (`unit`, `cell`)."""
    scores: dict[str, dict[tuple, float]] = {method: {}, baseline: {}}
    for r in rows:
        who, value = r.get(label), r.get(metric)
        if who in scores and isinstance(value, (int, float)) and not math.isnan(value):
            scores[who][(r[unit], r[cell])] = float(value)
    by_pair: dict[str, list[float]] = {}
    for key, value in scores[method].items():
        if key in scores[baseline]:
            by_pair.setdefault(key[0], []).append(value - scores[baseline][key])
    return {pair: float(np.mean(d)) for pair, d in by_pair.items()}


def paired_difference(rows: Sequence[dict[str, Any]], method: str, baseline: str, metric: str, *,
                      interval: str = "t", level: float = 0.95, label: str = "method", unit: str = "pair",
                      cell: str = "seed", seed: int = 0) -> PairedDifference:  # fmt: skip
    """The paired difference of `metric` between two row labels (see the module docstring)."""
    if interval not in INTERVALS:
        raise UserInputError(f"unknown interval {interval!r}; choose from {', '.join(INTERVALS)}")
    d = per_pair_differences(rows, method, baseline, metric, label=label, unit=unit, cell=cell)
    iv = confidence_interval(list(d.values()), level, method=interval, seed=seed)
    return PairedDifference(method, baseline, metric, iv.mean, iv.low, iv.high, iv.n, interval, d)


def forest_plot(diffs: Sequence[PairedDifference], path: Any, *, title: str) -> Any:
    """One panel per metric: each method's mean paired difference with its interval, a line at 0."""
    from pathlib import Path

    from lorafuse.eval.report import _plt, _save

    plt = _plt()
    metrics = list(dict.fromkeys(d.metric for d in diffs))
    labels = list(dict.fromkeys(d.method for d in diffs))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1.5, 0.32 * len(labels) + 1.4),
                             sharey=True, squeeze=False)  # fmt: skip
    for ax, metric in zip(axes[0], metrics, strict=True):
        for y, label in enumerate(labels):
            found = [d for d in diffs if d.metric == metric and d.method == label]
            if not found or found[0].n == 0:
                continue
            d = found[0]
            colour = {"better": "#2a7", "worse": "#c33"}.get(d.verdict, "#555")
            ax.errorbar(d.mean, y, xerr=[[d.mean - d.low], [d.high - d.mean]], fmt="o", color=colour, capsize=2)
        ax.axvline(0, color="#888", lw=0.8)
        ax.set_title(f"{metric}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, Path(path))
