"""Timing for ratios near 1: methods interleaved across rounds, medians and the spread beside them.

Goals such as "≤ 1.02x the base" sit inside the drift of a shared CPU (frequency scaling, other jobs), so
measuring A A A then B B B mixes the drift into the ratio. Running A B C, A B C, ... puts every method under the
same conditions within a round; the per-round ratio variant/base then cancels the slow drift, and its median
and interquartile range say how far apart two methods really are.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence

import numpy as np


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and IQR (nan for no values): the noise is shown, not averaged away."""
    if len(values) == 0:
        nan = float("nan")
        return {"median": nan, "q25": nan, "q75": nan, "iqr": nan, "n": 0}
    q25, q75 = np.quantile(np.asarray(values, dtype=np.float64), [0.25, 0.75])
    return {"median": float(statistics.median(values)), "q25": float(q25), "q75": float(q75),
            "iqr": float(q75 - q25), "n": len(values)}  # fmt: skip


def interleaved(runs: Mapping[str, Callable[[], float]], repeats: int, warmup: int = 1,
                on_round: Callable[[int], None] | None = None) -> dict[str, list[float]]:  # fmt: skip
    """Call every run once per round, in the given order, for `warmup` + `repeats` rounds; each run returns the
    seconds it measured (so set-up it must not count stays outside). The warm-up rounds are dropped: they fill
    caches and allocators. Returns {label: [seconds per kept round]}."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    times: dict[str, list[float]] = {label: [] for label in runs}
    for r in range(warmup + repeats):
        for label, run in runs.items():
            seconds = run()
            if r >= warmup:
                times[label].append(seconds)
        if on_round is not None:
            on_round(r)
    return times


def ratios(times: Mapping[str, Sequence[float]], reference: str) -> dict[str, list[float]]:
    """Per-round ratio of every label to `reference` (paired by round, so drift between rounds cancels)."""
    ref = times[reference]
    return {label: [t / r for t, r in zip(ts, ref, strict=True)] for label, ts in times.items()}
