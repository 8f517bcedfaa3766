"""SVD resize: lossless at full rank, error reported exactly and decreasing with rank; exact factorisation."""

from __future__ import annotations

import pytest
import torch

from lorafuse.errors import UserInputError
from lorafuse.lora.resize import factorize, resize_lora
from lorafuse.lora.state import LoraModule, LoraState

LIN = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "unet.down_blocks.1.resnets.0.conv1"
DENSE = "unet.mid_block.attentions.0.proj_in"


def state(seed: int = 0) -> LoraState:
    """Rank-12 linear (alpha 4), rank-8 3x3 LoCon (alpha None), and a dense rank-6 ΔW (LoHa-like)."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(48, 6, generator=g) @ torch.randn(6, 40, generator=g)
    return LoraState(
        modules={
            LIN: LoraModule(
                down=torch.randn(12, 40, generator=g), up=torch.randn(48, 12, generator=g), alpha=4.0
            ),
            CONV: LoraModule(
                down=torch.randn(8, 16, 3, 3, generator=g), up=torch.randn(24, 8, 1, 1, generator=g)
            ),
            DENSE: LoraModule(delta=dense),
        },
        metadata={"ss_network_dim": "12"},
    )


def rel_error(a: LoraModule, b: LoraModule) -> float:
    da, db = a.delta_weight().double(), b.delta_weight().double()
    return float((da - db).norm() / da.norm())


def test_resize_to_full_rank_is_lossless():
    src = state()
    out, report = resize_lora(src, 64)
    for key, m in src.modules.items():
        new = out.modules[key]
        assert new.down is not None and new.scale == 1.0  # plain LoRA, alpha = rank
        assert rel_error(m, new) < 1e-6, key
        assert report.modules[key].rel_error < 1e-6
    assert out.modules[LIN].rank == 12 and out.modules[CONV].rank == 8
    assert out.modules[CONV].down.shape == (8, 16, 3, 3) and out.modules[CONV].up.shape == (24, 8, 1, 1)
    assert report.total_rel_error < 1e-6
    assert out.metadata == src.metadata


def test_error_is_reported_exactly_and_decreases_with_rank():
    src = state()
    previous = float("inf")
    for rank in (1, 2, 4, 6):
        out, report = resize_lora(src, rank)
        for key, m in src.modules.items():
            new = out.modules[key]
            assert new.rank == rank
            measured = rel_error(m, new)
            assert report.modules[key].rel_error == pytest.approx(measured, rel=1e-4, abs=1e-6), key
        assert 0 < report.total_rel_error < previous
        previous = report.total_rel_error
    # total = sqrt(Σ lost²) / sqrt(Σ ‖ΔW‖²) over the stacked modules
    num = sum(
        rel_error(src.modules[k], out.modules[k]) ** 2 * src.modules[k].delta_weight().norm() ** 2
        for k in src.modules
    )
    den = sum(src.modules[k].delta_weight().norm() ** 2 for k in src.modules)
    assert report.total_rel_error == pytest.approx(float((num / den) ** 0.5), rel=1e-4)


def test_truncation_is_the_best_rank_k_approximation():
    """Eckart-Young: the error equals the discarded singular values of the dense ΔW, computed directly."""
    src = state()
    out, _ = resize_lora(src, 3)
    delta = src.modules[CONV].delta_weight().double().flatten(1)
    s = torch.linalg.svdvals(delta)
    expected = float(s[3:].square().sum().sqrt() / s.square().sum().sqrt())
    assert rel_error(src.modules[CONV], out.modules[CONV]) == pytest.approx(expected, rel=1e-4)


def test_conv_rank_and_dtype():
    src = state()
    for m in (src.modules[LIN], src.modules[CONV]):
        m.down, m.up = m.down.half(), m.up.half()
    out, report = resize_lora(src, 4, conv_rank=2)
    assert out.modules[LIN].rank == 4 and out.modules[CONV].rank == 2 and out.modules[DENSE].rank == 4
    assert out.modules[LIN].down.dtype == torch.float16  # fp16 files stay fp16
    assert report.conv_rank == 2
    with pytest.raises(UserInputError, match="at least 1"):
        resize_lora(src, 0)


def test_factorize_is_exact_at_the_numerical_rank():
    g = torch.Generator().manual_seed(1)
    delta = (torch.randn(24, 5, generator=g) @ torch.randn(5, 16 * 9, generator=g)).reshape(24, 16, 3, 3)
    m = factorize(delta)
    assert m.rank == 5
    assert m.down.shape == (5, 16, 3, 3) and m.up.shape == (24, 5, 1, 1)
    torch.testing.assert_close(m.delta_weight(), delta, atol=1e-4, rtol=1e-5)
