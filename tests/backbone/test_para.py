"""Rank-constrained backbone layers: the projection, zero bases, the rank schedule, stop-gradient, baking."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch.nn.utils import parametrize

from lorafuse.backbone import para
from lorafuse.errors import UserInputError
from lorafuse.models.tiny import tiny_unet

OPTS = para.ParaOptions(r_max=8, r_min=2, reference_width=0)


@functools.lru_cache(maxsize=1)
def _plain():
    return tiny_unet("sd15", seed=0)


@pytest.fixture
def unet():
    return copy.deepcopy(_plain())


def flat(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def test_rank_schedule_endpoints_and_monotone() -> None:
    r = para.rank_schedule(33, 128, 4)
    assert r[0] == 128 and r[-1] == 4 and len(r) == 33
    assert all(a >= b for a, b in zip(r, r[1:], strict=False))
    assert r[16] == 66  # the middle layer: 128 - 0.5 * 124, exactly
    assert para.rank_schedule(1, 128, 4) == [128] and para.rank_schedule(0, 8, 2) == []
    assert para.rank_schedule(3, 5, 2) == [5, 4, 2]  # 3.5 rounds half up


def test_tuned_layers_are_attention_and_convs_in_forward_order(unet) -> None:
    layers = para.tuned_layers(unet, OPTS)
    assert layers[0].startswith("down_blocks.0.") and layers[-1].startswith("up_blocks.3.")
    mid = [i for i, n in enumerate(layers) if n.startswith("mid_block.")]
    ups = [i for i, n in enumerate(layers) if n.startswith("up_blocks.")]
    assert mid and max(mid) < min(
        ups
    )  # diffusers registers up_blocks before mid_block; the forward runs mid first
    assert any(n.endswith("attn2.to_k") for n in layers) and any(
        n.endswith("resnets.0.conv1") for n in layers
    )
    assert not any(
        n in ("conv_in", "conv_out") or n.endswith(("proj_in", "ff.net.2", "conv_shortcut")) for n in layers
    )
    no_cross = para.tuned_layers(unet, para.ParaOptions(exclude_cross_attention=True))
    assert not any(".attn2." in n for n in no_cross) and any(".attn1." in n for n in no_cross)
    assert para.tuned_layers(unet, para.ParaOptions(layers=(r"mid_block.*to_q$",))) == [
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.transformer_blocks.0.attn2.to_q",
    ]  # fmt: skip


def test_ranks_are_scaled_to_the_model_and_capped(unet) -> None:
    ranks = para.layer_ranks(
        unet, para.ParaOptions()
    )  # widest block 64 of 1280: 128 -> 6, 4 -> 1 (at least 1)
    values = list(ranks.values())
    assert values[0] == 6 and values[-1] == 1
    big = para.layer_ranks(unet, para.ParaOptions(r_max=512, r_min=512, reference_width=0))
    modules = dict(unet.named_modules())
    assert all(r == modules[p].weight.shape[0] // 4 for p, r in big.items())


def test_projected_part_is_zero(unet) -> None:
    originals = {
        p: m.weight.detach().clone()
        for p, m in unet.named_modules()
        if hasattr(m, "weight") and m.weight is not None
    }
    ranks = para.apply_para(unet, OPTS, seed=1)
    bases = para.projected(unet)
    assert set(bases) == {p for p, r in ranks.items() if r > 0}
    for path, q in bases.items():
        w_new = flat(unet.get_submodule(path).weight).double()
        w_old = flat(originals[path]).double()
        assert q.shape[1] == 2 * ranks[path]
        torch.testing.assert_close(
            q.T.double() @ q.double(), torch.eye(q.shape[1], dtype=torch.float64), atol=1e-5, rtol=0
        )
        assert (q.T.double() @ w_new).abs().max() < 1e-5  # Qᵀ W' = 0
        assert (w_new - w_old).abs().max() > 1e-4  # and W' really differs from W
        # W' = W − Q Qᵀ W
        torch.testing.assert_close(w_new, w_old - q.double() @ (q.double().T @ w_old), atol=1e-5, rtol=0)


def test_zero_bases_leave_the_weights_exactly(unet) -> None:
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    para.apply_para(unet, OPTS)
    with torch.no_grad():
        for p in para.bases(unet).values():
            p.zero_()
    for path in para.projected(unet):
        module = unet.get_submodule(path)
        assert torch.equal(module.weight, before[f"{path}.weight"])
    with torch.no_grad():  # one basis zero: only the other's span is removed
        for name, p in para.bases(unet).items():
            if name.endswith(".content"):
                p.normal_()
    path = next(iter(para.projected(unet)))
    q = para.projected(unet)[path]
    assert int((q.abs().sum(0) > 0).sum()) == para.bases(unet)[f"{path}.content"].shape[1]


def test_stop_gradient_reaches_only_the_chosen_bases(unet) -> None:
    para.apply_para(unet, OPTS)
    x = torch.randn(1, 4, 8, 8)
    ehs = torch.randn(1, 5, unet.config.cross_attention_dim)
    for role, live in (("content", ".content"), ("style", ".style")):
        unet.zero_grad(set_to_none=True)
        with para.trainable_bases(unet, role):
            unet(x, torch.tensor([10]), ehs).sample.square().mean().backward()
        grads = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in para.bases(unet).items()}
        assert not any(g for n, g in grads.items() if not n.endswith(live))
        # all but a few get gradients (self-attention over the 1x1 mid block ignores its q and k)
        live_grads = [g for n, g in grads.items() if n.endswith(live)]
        assert sum(live_grads) >= 0.9 * len(live_grads)
    assert all(proj.role == "both" for proj in para._projections(unet).values())
    with pytest.raises(UserInputError, match="unknown basis role"), para.trainable_bases(unet, "texture"):
        pass


def test_bake_keeps_w_prime_and_removes_the_wrappers(unet) -> None:
    para.apply_para(unet, OPTS, seed=3)
    x, ehs = torch.randn(1, 4, 8, 8), torch.randn(1, 5, unet.config.cross_attention_dim)
    with torch.no_grad():
        before = unet(x, torch.tensor([10]), ehs).sample
    assert para.bake(unet) > 0
    assert not any(parametrize.is_parametrized(m) for m in unet.modules())
    with torch.no_grad():
        torch.testing.assert_close(unet(x, torch.tensor([10]), ehs).sample, before, rtol=0, atol=1e-6)
    assert set(unet.state_dict()) == set(_plain().state_dict())  # saves under the plain diffusers names


def test_orthonormal_handles_dependent_columns() -> None:
    b = torch.randn(16, 3)
    q = para.orthonormal(torch.cat([b, b], 1))  # the second copy adds nothing
    assert int((q.abs().sum(0) > 0).sum()) == 3
    assert torch.equal(para.orthonormal(torch.zeros(16, 4)), torch.zeros(16, 4))
