"""Contrastive pairs: the DCT, the Gaussian low-pass mask, two-branch mixing, the dataset folder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.fft import dctn

from lorafuse.backbone import pairs as P
from lorafuse.errors import UserInputError


def test_dct_matches_scipy_and_round_trips() -> None:
    x = torch.randn(2, 4, 12, 16, dtype=torch.float64)
    want = dctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1))
    torch.testing.assert_close(P.dct2(x), torch.from_numpy(want), atol=1e-12, rtol=0)
    torch.testing.assert_close(P.idct2(P.dct2(x)), x, atol=1e-12, rtol=0)
    x32 = x.float()
    torch.testing.assert_close(P.idct2(P.dct2(x32)), x32, atol=1e-6, rtol=0)


def test_lowpass_mask_properties() -> None:
    m = P.gaussian_lowpass(20, 20, 0.35)
    assert m[0, 0] == 1 and bool((m > 0).all()) and bool((m <= 1).all())
    assert bool((m[1:, :] <= m[:-1, :]).all()) and bool((m[:, 1:] <= m[:, :-1]).all())  # falls with frequency
    assert math.isclose(float(m[7, 0]), math.exp(-0.5), rel_tol=1e-12)  # f = 7/20 = σ: e^{-1/2}
    assert torch.equal(m, m.T)
    wide = P.gaussian_lowpass(20, 20, 2.0)
    assert bool((wide >= m).all())  # a higher cutoff keeps more
    with pytest.raises(UserInputError):
        P.gaussian_lowpass(4, 4, 0)


def test_mixing_identical_branches_is_a_no_op() -> None:
    z = torch.randn(3, 4, 16, 16)
    torch.testing.assert_close(P.frequency_mix(z, z), z, atol=1e-6, rtol=0)


def test_mixing_takes_low_frequencies_from_a_and_high_from_b() -> None:
    a, b = torch.randn(1, 4, 16, 16, dtype=torch.float64), torch.randn(1, 4, 16, 16, dtype=torch.float64)
    m = P.gaussian_lowpass(16, 16)
    mixed = P.dct2(P.frequency_mix(a, b))
    torch.testing.assert_close(mixed, m * P.dct2(a) + (1 - m) * P.dct2(b), atol=1e-12, rtol=0)
    assert torch.allclose(mixed[..., 0, 0], P.dct2(a)[..., 0, 0])  # DC from a (mask 1 there)


def test_mixed_sampling_with_one_prompt_is_plain_sampling() -> None:
    from lorafuse.fusion.sampling import sample
    from lorafuse.models.tiny import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(0)
    prompt = "a photo of a dog"
    mixed = P.mixed_sample(pipe, [prompt], [prompt], [7], steps=3, guidance=5.0)
    plain = sample(pipe, prompt, steps=3, guidance=5.0, seed=7, progress=False).images
    assert mixed.shape == (1, 64, 64, 3) and mixed.dtype == np.uint8
    assert np.abs(mixed.astype(int) - np.round(plain * 255).astype(int)).max() <= 1
    other = P.mixed_sample(pipe, [prompt], ["a watercolor painting of a house"], [7], steps=3, guidance=5.0)
    assert np.abs(other.astype(int) - mixed.astype(int)).max() > 0


def test_render_pairs_write_and_read(tmp_path) -> None:
    inds, styles = P.world_references(2, 3)
    content, style = P.render_pairs(inds, styles, seed=0)
    assert content.shape == style.shape == (2, 3, 64, 64, 3)
    assert not np.array_equal(content[0, 0], style[0, 0])  # the two images of a pair differ (other streams)
    contents, style_words = P.world_prompts(inds, styles)
    captions = [[f"{c}, {s}" for s in style_words] for c in contents]
    folder = P.write_pairs(tmp_path / "pairs", content, style, captions, inds, styles, {"mode": "render"})
    read = P.read_pairs(folder)
    assert len(read) == 6 and read[0].caption.startswith("a photo of a ")
    assert (folder / "contact_sheet.png").is_file()
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(folder / read[4].style_image)), style[read[4].i, read[4].j])
    with pytest.raises(UserInputError, match="no pairs.json"):
        P.read_pairs(tmp_path)


def test_generate_pairs_routes_prompts_to_branches(monkeypatch) -> None:
    # CRAFT §3.3.2: a content-fixed image keeps the content prompt in the low-frequency branch (a) and adds the
    # style in the high one (b); a style-fixed image keeps the style prompt in b and varies the content in a.
    calls: list[tuple[str, str, int]] = []

    def fake_mixed_sample(pipe, lows, highs, seeds, **kwargs):
        start = len(calls)
        calls.extend(zip(lows, highs, seeds, strict=True))
        # image k carries its job number, so the test also sees where each job's image lands in the grid
        return np.stack([np.full((2, 2, 3), start + k, np.uint8) for k in range(len(lows))])

    monkeypatch.setattr(P, "mixed_sample", fake_mixed_sample)
    contents, styles = ["a photo of a red car", "a photo of a blue fish"], ["in crayon style", "in ink style"]
    content_fixed, style_fixed = P.generate_pairs(None, contents, styles, seed=3, batch=3)
    by_job = dict(enumerate(calls))
    for i, c in enumerate(contents):
        for j, s in enumerate(styles):
            low, high, seed = by_job[int(content_fixed[i, j, 0, 0, 0])]
            assert (low, high, seed) == (c, f"{c}, {s}", 3000 + i)  # content-fixed: a = c_i, b = c_i + s_j
            low, high, seed = by_job[int(style_fixed[i, j, 0, 0, 0])]
            assert (low, high, seed) == (f"{c}, {s}", s, 3500 + j)  # style-fixed: a = c_i + s_j, b = s_j
    assert len(calls) == 2 * len(contents) * len(styles)


def test_mixed_sampling_takes_layout_from_the_low_branch() -> None:
    # with a cutoff far above every frequency, M_low = 1: the image is branch a's alone (the first prompt list)
    from lorafuse.fusion.sampling import sample
    from lorafuse.models.tiny import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(0)
    low, high = "a photo of a dog", "a watercolor painting of a house"
    mixed = P.mixed_sample(pipe, [low], [high], [5], steps=3, guidance=5.0, cutoff=1e6)
    for prompt, expect_close in ((low, True), (high, False)):
        plain = np.round(sample(pipe, prompt, steps=3, guidance=5.0, seed=5, progress=False).images * 255)
        assert bool(np.abs(mixed.astype(int) - plain.astype(int)).max() <= 1) is expect_close
