"""The metric table: every reader gets direction, aggregation and derived values from one place."""

from __future__ import annotations

import math

import pytest

from lorafuse.eval.measures import METRICS, Metric, derived, describe, metric
from lorafuse.eval.metrics import confidence_interval, proportion_interval


def test_rates_use_wilson_and_scores_student_t() -> None:
    values = [1.0, 0.0, 1.0, 1.0]
    assert metric("right_style").aggregate(values) == proportion_interval(values)
    assert metric("oracle_style").aggregate(values) == confidence_interval(values)
    assert all(m.rate == name.startswith("right_") for name, m in METRICS.items())


def test_unknown_column_is_a_plain_mean() -> None:
    m = metric("my_score")
    assert isinstance(m, Metric) and m.higher_is_better is None and not m.rate


def test_derived_values_and_when_they_exist() -> None:
    scores = {"oracle_content": 0.6, "oracle_style": 0.3, "clip_i_content": 0.5}
    plain = derived(scores)
    assert plain == pytest.approx({"oracle_amean": 0.45, "oracle_hmean": 0.4})  # clip has no style column
    fused = derived(scores, {"oracle_content": 0.8}, {"oracle_style": 0.6})
    # ci = ½[(0.8 − 0.6)/0.8 + (0.6 − 0.3)/0.6] = ½[0.25 + 0.5]
    assert fused["oracle_ci"] == pytest.approx(0.375) and fused["oracle_ci_product"] == pytest.approx(0.18)
    assert math.isnan(derived(scores, {"oracle_content": -0.1}, {"oracle_style": 0.6})["oracle_ci"])


def test_describe_says_which_direction_is_better() -> None:
    text = describe(["oracle_ci", "right_style", "seconds_per_image"])
    assert "oracle_ci: cross-influence" in text and "(lower is better)" in text
    assert "right_style: the oracle names the right style (higher is better); a rate, Wilson interval." in text
