"""Exact merges (ΔW = Σ w_i ΔW_i), the svd and kohya-legacy modes, and fuse / unfuse on a tiny pipeline."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

from lorafuse.errors import LorafuseError, UserInputError
from lorafuse.lora import inject as inj
from lorafuse.lora.merge import MERGE_METADATA_KEY, fuse_into, is_fused, merge_loras, unfuse
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.models.tiny import tiny_pipeline

LIN = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "unet.down_blocks.0.resnets.0.conv1"
ONLY_C = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
ONLY_S = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


def lora(seed: int, rank: int, alpha: float | None, keys: dict[str, tuple[int, ...]]) -> LoraState:
    """Random non-zero factors for `keys` (key -> base weight shape); 4-D shapes get LoCon factors."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for key, (out_f, in_f, *kernel) in keys.items():
        down = torch.randn((rank, in_f, *kernel), generator=g)
        up = torch.randn((out_f, rank, *([1, 1] if kernel else [])), generator=g)
        modules[key] = LoraModule(down=down, up=up, alpha=alpha)
    return LoraState(modules=modules)


@pytest.fixture
def pair() -> tuple[LoraState, LoraState]:
    """Content rank 4 (alpha 2) and style rank 8 (alpha None = 8): different ranks and scales."""
    content = lora(0, 4, 2.0, {LIN: (32, 32), CONV: (32, 32, 3, 3), ONLY_C: (32, 32)})
    style = lora(1, 8, None, {LIN: (32, 32), CONV: (32, 32, 3, 3), ONLY_S: (32, 32)})
    return content, style


def test_exact_merge_is_the_weighted_sum_of_deltas(pair):
    content, style = pair
    w_c, w_s = 1.0, 0.5
    merged = merge_loras([content, style], [w_c, w_s])
    assert set(merged.modules) == {LIN, CONV, ONLY_C, ONLY_S}  # modules present in only one LoRA are kept
    for key in (LIN, CONV):
        m = merged.modules[key]
        assert m.rank == 12 and m.scale == 1.0  # rank-concatenated, alpha = rank
        expected = w_c * content.modules[key].delta_weight() + w_s * style.modules[key].delta_weight()
        torch.testing.assert_close(m.delta_weight(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        merged.modules[ONLY_C].delta_weight(), w_c * content.modules[ONLY_C].delta_weight()
    )
    torch.testing.assert_close(
        merged.modules[ONLY_S].delta_weight(), w_s * style.modules[ONLY_S].delta_weight()
    )
    record = json.loads(merged.metadata[MERGE_METADATA_KEY])
    assert record["mode"] == "exact" and record["weights"] == [1.0, 0.5]


def test_exact_merge_handles_layouts_dense_modules_and_zero_weights(pair):
    content, style = pair
    # the same 1x1 conv stored 2-D by one trainer and 4-D by another; a dense (LoHa-like) ΔW
    g = torch.Generator().manual_seed(2)
    proj = "unet.down_blocks.0.attentions.0.proj_in"
    content.modules[proj] = LoraModule(
        down=torch.randn(2, 32, generator=g), up=torch.randn(32, 2, generator=g)
    )
    style.modules[proj] = LoraModule(
        down=torch.randn(3, 32, 1, 1, generator=g), up=torch.randn(32, 3, 1, 1, generator=g)
    )
    dense = torch.randn(32, 3, generator=g) @ torch.randn(3, 32, generator=g)
    style.modules[ONLY_S] = LoraModule(delta=dense)
    merged = merge_loras([content, style], [0.3, -1.0])
    expected = 0.3 * content.modules[proj].delta_weight() - style.modules[proj].delta_weight().flatten(1)
    torch.testing.assert_close(merged.modules[proj].delta_weight((32, 32)), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.modules[ONLY_S].delta_weight(), -dense, atol=1e-4, rtol=1e-5)
    assert merged.modules[ONLY_S].rank == 3

    only_content = merge_loras([content, style], [1.0, 0.0])  # weight 0: no rank spent on zeros
    assert set(only_content.modules) == set(content.modules)
    for key, m in content.modules.items():
        torch.testing.assert_close(
            only_content.modules[key].delta_weight(), m.delta_weight(), atol=1e-5, rtol=1e-5
        )
    with pytest.raises(UserInputError, match="every merge weight is 0"):
        merge_loras([content, style], [0.0, 0.0])
    with pytest.raises(UserInputError, match="one weight per LoRA"):
        merge_loras([content, style], [1.0])


def test_mismatched_shapes_refuse_to_merge(pair):
    content, _ = pair
    other = lora(3, 4, None, {LIN: (64, 32)})
    with pytest.raises(UserInputError, match="different base models"):
        merge_loras([content, other], [1.0, 1.0])


def test_svd_merge_truncates_the_exact_sum(pair):
    content, style = pair
    exact = merge_loras([content, style], [1.0, 0.5])
    full = merge_loras([content, style], [1.0, 0.5], mode="svd", rank=12)
    for key, m in exact.modules.items():
        torch.testing.assert_close(full.modules[key].delta_weight(), m.delta_weight(), atol=1e-4, rtol=1e-4)
    errors = []
    for rank in (2, 4, 8):
        merged = merge_loras([content, style], [1.0, 0.5], mode="svd", rank=rank)
        assert max(m.rank for m in merged.modules.values()) <= rank
        errors.append(json.loads(merged.metadata[MERGE_METADATA_KEY])["svd_rel_error"])
    assert errors[0] > errors[1] > errors[2] > 0
    with pytest.raises(UserInputError, match="needs a target rank"):
        merge_loras([content, style], [1.0, 0.5], mode="svd")


def test_kohya_legacy_reproduces_the_factor_sum(pair):
    a = lora(5, 4, 2.0, {LIN: (32, 32)})
    b = lora(6, 4, 4.0, {LIN: (32, 32)})
    w_a, w_b = 1.0, -0.5
    legacy = merge_loras([a, b], [w_a, w_b], mode="kohya_legacy").modules[LIN]
    # kohya: factors scaled by sqrt(alpha_i / alpha_0) * ratio (|.| on up), summed; alpha of the first file
    f_b = (4.0 / 2.0) ** 0.5 * w_b
    up = a.modules[LIN].up * w_a + b.modules[LIN].up * abs(f_b)
    down = a.modules[LIN].down * w_a + b.modules[LIN].down * f_b
    torch.testing.assert_close(legacy.delta_weight(), (2.0 / 4) * up @ down)
    exact = w_a * a.modules[LIN].delta_weight() + w_b * b.modules[LIN].delta_weight()
    assert (legacy.delta_weight() - exact).abs().max() > 0.1  # cross terms: not the weighted sum
    content, style = pair
    with pytest.raises(UserInputError, match="equal ranks"):
        merge_loras([content, style], [1.0, 1.0], mode="kohya_legacy")


# --- fuse / unfuse --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _base():
    return tiny_pipeline("sd15", seed=0)


def pipeline_lora(seed: int = 0) -> LoraState:
    keys = {
        LIN: (32, 32),
        CONV: (32, 32, 3, 3),
        "unet.up_blocks.3.attentions.0.transformer_blocks.0.attn2.to_v": (32, 32),
        ONLY_S: (32, 32),
    }
    state = lora(seed, 4, 2.0, keys)
    for m in state.modules.values():
        m.up *= 0.05
        m.down *= 0.05
    return state


def unet_out(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ehs = torch.randn(2, 6, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([10, 700]), ehs).sample


def params(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{c}.{k}": v.clone()
        for c in ("unet", "text_encoder")
        for k, v in getattr(pipe, c).state_dict().items()
    }


def test_fuse_equals_adapter_and_unfuse_restores_exactly():
    pipe = copy.deepcopy(_base())
    state = pipeline_lora()
    before = params(pipe)
    base = unet_out(pipe)
    assert fuse_into(pipe, state, 0.8) == len(state.modules)
    assert is_fused(pipe)
    fused = unet_out(pipe)
    assert (fused - base).abs().max() > 1e-3
    adapter = copy.deepcopy(_base())
    inj.inject_lora(adapter, state, "a", weight=0.8)
    torch.testing.assert_close(fused, unet_out(adapter), atol=1e-5, rtol=1e-4)
    # stacking a second fuse, then one unfuse: back to the weights from before the first fuse, bit for bit
    fuse_into(pipe, pipeline_lora(seed=1), 1.0)
    assert unfuse(pipe) == len(state.modules)
    assert not is_fused(pipe)
    after = params(pipe)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert torch.equal(unet_out(pipe), base)


def test_fuse_weight_zero_is_the_base_and_non_finite_fuses_nothing(monkeypatch):
    pipe = copy.deepcopy(_base())
    base = unet_out(pipe)
    fuse_into(pipe, pipeline_lora(), 0.0)
    assert torch.equal(unet_out(pipe), base)
    unfuse(pipe)
    before = params(pipe)
    broken = pipeline_lora()
    broken.modules[CONV].up.fill_(1e30)
    broken.modules[CONV].down.fill_(1e30)
    with pytest.raises(LorafuseError, match=f"{CONV}: its update is .* times the size of the base weight"):
        fuse_into(pipe, broken, 1.0)  # refused by validation, before anything is touched
    assert not is_fused(pipe)
    monkeypatch.setattr("lorafuse.lora.validate.check_against_base", lambda *a: [])
    with pytest.raises(LorafuseError, match=f"{CONV}.*non-finite"):
        fuse_into(pipe, broken, 1.0)  # the last line of defence
    assert not is_fused(pipe)
    after = params(pipe)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
