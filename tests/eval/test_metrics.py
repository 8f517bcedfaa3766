"""Metric formulas against numbers worked out by hand, the t and bootstrap intervals, reference loading, and the
oracle scorer against a direct computation with the oracle's own embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from lorafuse.errors import UserInputError
from lorafuse.eval.measures import derived as aggregates
from lorafuse.eval.metrics import (
    OracleScorer,
    arithmetic_mean,
    ci_product,
    confidence_interval,
    cross_influence,
    harmonic_mean,
    load_reference_folder,
    mean_cosine,
    proportion_interval,
    world_references,
)
from lorafuse.world.oracle import Oracle, OracleModel


def test_cross_influence_by_hand() -> None:
    # ½[(0.8 − 0.6)/0.8 + (0.5 − 0.4)/0.5] = ½[0.25 + 0.2] = 0.225
    assert float(cross_influence(0.8, 0.6, 0.5, 0.4)) == pytest.approx(0.225)
    assert float(cross_influence(0.8, 0.8, 0.5, 0.5)) == 0.0  # nothing lost
    assert float(cross_influence(0.8, 0.0, 0.5, 0.5)) == pytest.approx(0.5)  # content lost entirely
    assert float(cross_influence(0.8, 0.9, 0.5, 0.6)) == pytest.approx(-0.1625)  # fusion helped: negative
    out = cross_influence([0.8, 0.0, 0.8], [0.6, 0.6, 0.6], [0.5, 0.5, -0.1], [0.4, 0.4, 0.4])
    assert out[0] == pytest.approx(0.225) and math.isnan(out[1]) and math.isnan(out[2])


def test_means_and_product_by_hand() -> None:
    assert float(ci_product(0.6, 0.4)) == pytest.approx(0.24)
    assert float(arithmetic_mean(0.6, 0.4)) == pytest.approx(0.5)
    assert float(harmonic_mean(0.6, 0.4)) == pytest.approx(0.48)  # 2·0.24/1.0
    assert float(harmonic_mean(0.9, 0.1)) == pytest.approx(0.18)  # one-sided: far below the arithmetic 0.5
    assert float(harmonic_mean(0.9, -0.1)) == 0.0 and float(harmonic_mean(0.0, 0.5)) == 0.0
    agg = aggregates(
        {"oracle_content": 0.6, "oracle_style": 0.4}, {"oracle_content": 0.8}, {"oracle_style": 0.5}
    )
    assert agg == pytest.approx(
        {"oracle_amean": 0.5, "oracle_hmean": 0.48, "oracle_ci_product": 0.24, "oracle_ci": 0.225}
    )
    assert aggregates({"oracle_content": 0.6, "oracle_style": 0.4}) == pytest.approx(
        {"oracle_amean": 0.5, "oracle_hmean": 0.48}
    )  # not fused: no cross-influence
    assert aggregates({"clip_i_content": 0.6}) == {}


def test_mean_cosine_by_hand() -> None:
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    refs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(mean_cosine(e, refs), [0.5, 0.7])


def test_t_interval_by_hand() -> None:
    # mean 2.5, sd 1.29099, se 0.645497, t(0.975, 3) = 3.182446 -> half width 2.054260
    iv = confidence_interval([1, 2, 3, 4])
    assert (iv.mean, iv.n) == (2.5, 4)
    assert iv.low == pytest.approx(2.5 - 2.0542603, abs=1e-6) and iv.high == pytest.approx(
        2.5 + 2.0542603, abs=1e-6
    )
    iv90 = confidence_interval([1, 2, 3, 4], level=0.9)  # t(0.95, 3) = 2.353363
    assert iv90.high - iv90.mean == pytest.approx(2.353363 * 0.6454972, abs=1e-6)
    assert confidence_interval([0.3]).low == confidence_interval([0.3]).high == 0.3
    assert math.isnan(confidence_interval([]).mean)
    assert confidence_interval([1.0, float("nan"), 3.0]).n == 2  # undefined values are dropped
    with pytest.raises(UserInputError, match="unknown confidence-interval method"):
        confidence_interval([1, 2], method="magic")


def test_bootstrap_interval() -> None:
    x = np.random.default_rng(0).normal(1.0, 0.5, size=400)
    boot = confidence_interval(x, method="bootstrap", n_boot=4000, seed=1)
    t = confidence_interval(x)
    assert boot.low < boot.mean < boot.high
    assert boot.low == pytest.approx(t.low, abs=0.01) and boot.high == pytest.approx(t.high, abs=0.01)
    assert confidence_interval(x, method="bootstrap", n_boot=4000, seed=1) == boot  # seeded: reproducible
    const = confidence_interval([2.0] * 5, method="bootstrap")
    assert const.low == const.high == 2.0


def test_wilson_interval_by_hand() -> None:
    # 0 of 4, z = 1.959964: centre = (z²/8)/(1 + z²/4) = 0.244945, half the same -> [0, 0.489891]
    iv = proportion_interval([0, 0, 0, 0])
    assert iv.mean == 0.0 and iv.low == 0.0 and iv.high == pytest.approx(0.489891, abs=1e-6)
    # 3 of 4: p = 0.75 -> [0.300642, 0.954413]
    iv = proportion_interval([1, 1, 0, 1])
    assert iv.mean == 0.75
    assert (iv.low, iv.high) == (pytest.approx(0.300642, abs=1e-6), pytest.approx(0.954413, abs=1e-6))


def test_world_references_are_the_dataset_references(tmp_path) -> None:
    from lorafuse.world.dataset import write_style_dataset, write_subject_dataset

    write_subject_dataset("teapot_08", tmp_path / "subj", n=1)
    write_style_dataset("ink", tmp_path / "sty", n=1)
    np.testing.assert_array_equal(load_reference_folder(tmp_path / "subj" / "references", "content"),
                                  world_references(individual="teapot_08"))  # fmt: skip
    np.testing.assert_array_equal(load_reference_folder(tmp_path / "sty" / "references", "style"),
                                  world_references(style="ink"))  # fmt: skip


def test_reference_folder_errors(tmp_path) -> None:
    with pytest.raises(UserInputError, match="content references: .* is not a folder"):
        load_reference_folder(tmp_path / "nope", "content")
    (tmp_path / "e").mkdir()
    with pytest.raises(UserInputError, match="holds no images"):
        load_reference_folder(tmp_path / "e", "style")
    Image.new("RGB", (64, 64)).save(tmp_path / "e" / "a.png")
    Image.new("RGB", (48, 64)).save(tmp_path / "e" / "b.png")
    with pytest.raises(UserInputError, match=r"different sizes \(a.png 64x64, b.png 48x64\)"):
        load_reference_folder(tmp_path / "e", "style")


def test_oracle_scorer_against_direct_computation() -> None:
    torch.manual_seed(0)
    oracle = Oracle(OracleModel())
    images = np.random.default_rng(0).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    scores = OracleScorer(oracle, individual="teapot_08", style="ink")(images)
    v = oracle.judge(images)
    c_ref = oracle.judge(world_references(individual="teapot_08")).content
    s_ref = oracle.judge(world_references(style="ink")).style
    np.testing.assert_allclose(scores["oracle_content"], (v.content @ c_ref.T).mean(1).numpy(), atol=1e-6)
    np.testing.assert_allclose(scores["oracle_style"], (v.style @ s_ref.T).mean(1).numpy(), atol=1e-6)
    assert list(scores["right_individual"]) == [float(p == "teapot_08") for p in v.individual]
    assert list(scores["right_class"]) == [float(p == "teapot") for p in v.cls]
    assert list(scores["right_style"]) == [float(p == "ink") for p in v.style_name]
    # the oracle's own similarity helper agrees
    np.testing.assert_allclose(scores["oracle_content"],
                               oracle.content_similarity(images, world_references(individual="teapot_08")).numpy(),
                               atol=1e-6)  # fmt: skip
    only = OracleScorer(oracle)(images)
    assert set(only) == {"pred_individual", "pred_class", "pred_style"}
