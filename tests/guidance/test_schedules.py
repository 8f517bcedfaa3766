"""Timestep weight schedules: the reported CRAFT windows, the cosine φ, LoRA Switch and K-LoRA's scale."""

from __future__ import annotations

import math

import pytest

from lorafuse.errors import UserInputError
from lorafuse.guidance.schedules import (
    cosine_phi,
    klora_scale,
    progress,
    smooth_weights,
    switch_index,
    window,
    window_weights,
)


def test_progress_runs_from_zero_below_one() -> None:
    assert [progress(i, 4) for i in range(4)] == [0.0, 0.25, 0.5, 0.75]
    for i, n in [(-1, 4), (4, 4), (0, 0)]:
        with pytest.raises(UserInputError):
            progress(i, n)


def test_cosine_phi_falls_from_one_to_zero() -> None:
    assert cosine_phi(0.0) == 1.0
    assert math.isclose(cosine_phi(0.5), 0.5)
    assert math.isclose(cosine_phi(1.0), 0.0, abs_tol=1e-12)
    values = [cosine_phi(i / 50) for i in range(51)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_craft_reported_windows_at_fifty_steps() -> None:
    # Content for (1-based) steps 1-35, style for steps 15-50 of 50 (docs/algorithms.md §7.5).
    weights = [window_weights(progress(i, 50)) for i in range(50)]
    content = [i + 1 for i, (c, _) in enumerate(weights) if c == 1.0]
    style = [i + 1 for i, (_, s) in enumerate(weights) if s == 1.0]
    assert content == list(range(1, 36))
    assert style == list(range(15, 51))


def test_window_bounds() -> None:
    assert window(0.0, 0.0, 0.5) == 1.0 and window(0.5, 0.0, 0.5) == 0.0
    with pytest.raises(UserInputError, match="start <= end"):
        window(0.1, 0.6, 0.5)


def test_smooth_weights_hand_over_from_content_to_style() -> None:
    assert smooth_weights(0.0, 0.8, 0.6) == (0.8, 0.0)
    c, s = smooth_weights(0.5, 1.0, 1.0)
    assert math.isclose(c, 0.5) and math.isclose(s, 0.5)
    ws = [smooth_weights(progress(i, 20)) for i in range(20)]
    assert all(math.isclose(c + s, 1.0) for c, s in ws)
    assert all(a[0] > b[0] and a[1] < b[1] for a, b in zip(ws, ws[1:], strict=False))


def test_switch_rotates_every_tau_steps() -> None:
    assert [switch_index(i, 5, 2) for i in range(20)] == ([0] * 5 + [1] * 5) * 2
    assert [switch_index(i, 1, 3) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    with pytest.raises(UserInputError, match="tau"):
        switch_index(0, 0, 2)


def test_klora_scale_rises_linearly_from_beta() -> None:
    assert klora_scale(0, 10) == 0.5
    assert math.isclose(klora_scale(5, 10), 1.5 * 0.5 + 0.5)
    assert klora_scale(9, 10) < 2.0
