"""Paired differences on synthetic scores: the pair is the unit (seeds averaged first), the t-interval is scipy's
paired t-test interval, the bootstrap agrees on well-behaved data, missing cells are dropped, a shared pair effect
cancels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lorafuse.errors import UserInputError
from lorafuse.eval.paired import forest_plot, paired_difference, per_pair_differences


def synthetic_rows(n_pairs=20, seeds=4, shift=0.05, pair_sd=0.2, noise_sd=0.02, seed=0):
    """Scores = pair effect (large, shared by both methods) + method shift + per-image noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_pairs):
        effect = rng.normal(0.5, pair_sd)
        for s in range(seeds):
            for method, delta in (("direct", 0.0), ("new", shift)):
                rows.append({"pair": f"p{p}", "seed": s, "method": method,
                             "oracle_hmean": effect + delta + rng.normal(0, noise_sd)})  # fmt: skip
    return rows


def test_t_interval_is_the_paired_t_test_over_pairs() -> None:
    rows = synthetic_rows()
    d = paired_difference(rows, "new", "direct", "oracle_hmean")
    per_pair = np.array(list(d.per_pair.values()))
    assert d.n == 20 and len(per_pair) == 20
    by_hand = {p: np.mean([r["oracle_hmean"] for r in rows if r["pair"] == p and r["method"] == "new"])
               - np.mean([r["oracle_hmean"] for r in rows if r["pair"] == p and r["method"] == "direct"])
               for p in d.per_pair}  # fmt: skip
    assert d.per_pair == pytest.approx(by_hand)
    ci = stats.ttest_1samp(per_pair, 0.0).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    # the shared pair effect (sd 0.2) cancels: the interval is far narrower than an unpaired one
    assert d.low > 0 and d.verdict == "better"
    assert d.high - d.low < 0.05 and abs(d.mean - 0.05) < 0.02


def test_bootstrap_agrees_and_no_shift_shows_no_difference() -> None:
    rows = synthetic_rows(shift=0.0, seed=3)
    t = paired_difference(rows, "new", "direct", "oracle_hmean")
    boot = paired_difference(rows, "new", "direct", "oracle_hmean", interval="bootstrap")
    assert t.verdict == boot.verdict == "no difference shown"
    assert boot.low == pytest.approx(t.low, abs=0.006) and boot.high == pytest.approx(t.high, abs=0.006)
    worse = paired_difference(synthetic_rows(shift=-0.05), "new", "direct", "oracle_hmean")
    assert worse.verdict == "worse" and str(worse).startswith("-0.0")


def test_cells_missing_on_either_side_are_dropped() -> None:
    rows = synthetic_rows(n_pairs=3, seeds=2, noise_sd=0.0, shift=0.1)
    rows = [r for r in rows if not (r["pair"] == "p0" and r["method"] == "new")]  # p0: baseline only
    rows = [r for r in rows if not (r["pair"] == "p1" and r["seed"] == 1 and r["method"] == "direct")]
    rows.append({"pair": "p2", "seed": 0, "method": "other", "oracle_hmean": 9.0})
    rows[-2]["oracle_hmean"] = math.nan  # an undefined score is no score
    d = per_pair_differences(rows, "new", "direct", "oracle_hmean")
    assert set(d) == {"p1", "p2"} and d["p1"] == pytest.approx(0.1)
    one = paired_difference([r for r in rows if r["pair"] == "p1"], "new", "direct", "oracle_hmean")
    assert one.n == 1 and one.verdict == "too few pairs"
    with pytest.raises(UserInputError, match="unknown interval"):
        paired_difference(rows, "new", "direct", "oracle_hmean", interval="wilson")


def test_forest_plot_writes_a_png(tmp_path) -> None:
    rows = synthetic_rows(n_pairs=5, seeds=2)
    diffs = [paired_difference(rows, "new", "direct", m) for m in ("oracle_hmean",)]
    path = forest_plot(diffs, tmp_path / "diff.png", title="paired differences")
    assert path.read_bytes()[:4] == b"\x89PNG"
