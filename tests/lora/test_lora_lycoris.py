"""LyCORIS LoCon (Tucker) / LoHa / LoKr rebuilt to ΔW, checked against slow element-by-element references."""

from __future__ import annotations

import itertools

import torch
from safetensors.torch import save_file

from lorafuse.lora.formats.lycoris import locon_tucker_delta, loha_delta, lokr_delta
from lorafuse.lora.io import load_lora
from lorafuse.lora.validate import validate_lora

g = torch.Generator().manual_seed(0)


def rnd(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64).float()


def slow_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    for i, j, k in itertools.product(range(a.shape[0]), range(b.shape[1]), range(a.shape[1])):
        out[i, j] += float(a[i, k]) * float(b[k, j])
    return out


def slow_tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """W[o, i, h, w] = Σ_ab t[a, b, h, w] · wa[a, o] · wb[b, i]  (wa: (r, out), wb: (r, in))."""
    r1, r2, kh, kw = t.shape
    out = torch.zeros(wa.shape[1], wb.shape[1], kh, kw, dtype=torch.float64)
    for o, i, h, w in itertools.product(range(wa.shape[1]), range(wb.shape[1]), range(kh), range(kw)):
        out[o, i, h, w] = sum(
            float(t[a, b, h, w]) * float(wa[a, o]) * float(wb[b, i]) for a in range(r1) for b in range(r2)
        )
    return out


def slow_kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """kron over the first two dims; extra (kernel) dims come from b (a is broadcast over them)."""
    p, q = b.shape[:2]
    out = torch.zeros(a.shape[0] * p, a.shape[1] * q, *b.shape[2:], dtype=torch.float64)
    for i, j, k, m in itertools.product(range(a.shape[0]), range(a.shape[1]), range(p), range(q)):
        out[i * p + k, j * q + m] = float(a[i, j]) * b[k, m].double()
    return out


def close(fast: torch.Tensor, slow: torch.Tensor) -> None:
    assert fast.shape == slow.shape
    # float32 einsum vs float64 loops over at most a few dozen products: 1e-5 relative is ~100 ulp
    torch.testing.assert_close(fast.double(), slow, rtol=1e-5, atol=1e-6)
    assert slow.abs().max() > 0.1  # the reference is not trivially zero


def test_loha_linear():
    p = {"hada_w1_a": rnd(6, 3), "hada_w1_b": rnd(3, 5), "hada_w2_a": rnd(6, 3), "hada_w2_b": rnd(3, 5)}
    p["alpha"] = torch.tensor(1.5)
    slow = (
        (1.5 / 3) * slow_matmul(p["hada_w1_a"], p["hada_w1_b"]) * slow_matmul(p["hada_w2_a"], p["hada_w2_b"])
    )
    close(loha_delta(p, "t"), slow)


def test_loha_conv_tucker_and_flattened():
    t1, t2 = rnd(2, 2, 3, 3), rnd(2, 2, 3, 3)
    p = {"hada_t1": t1, "hada_w1_a": rnd(2, 4), "hada_w1_b": rnd(2, 3), "hada_t2": t2, "hada_w2_a": rnd(2, 4)}
    p["hada_w2_b"] = rnd(2, 3)
    slow = slow_tucker(t1, p["hada_w1_a"], p["hada_w1_b"]) * slow_tucker(t2, p["hada_w2_a"], p["hada_w2_b"])
    close(loha_delta(p, "t"), slow)  # no alpha: scale 1
    # without Tucker a conv LoHa is stored flattened (out, in·kh·kw)
    q = {"hada_w1_a": rnd(4, 2), "hada_w1_b": rnd(2, 27), "hada_w2_a": rnd(4, 2), "hada_w2_b": rnd(2, 27)}
    flat = loha_delta(q, "t")
    assert flat.shape == (4, 27)
    close(flat, slow_matmul(q["hada_w1_a"], q["hada_w1_b"]) * slow_matmul(q["hada_w2_a"], q["hada_w2_b"]))


def test_lokr_variants():
    # w1 full, w2 low rank (linear): rank from w2_b, scale alpha / r
    p = {"lokr_w1": rnd(2, 3), "lokr_w2_a": rnd(4, 2), "lokr_w2_b": rnd(2, 5), "alpha": torch.tensor(1.0)}
    close(lokr_delta(p, "t"), 0.5 * slow_kron(p["lokr_w1"], slow_matmul(p["lokr_w2_a"], p["lokr_w2_b"])))
    # w1 factorised, w2 full
    p = {"lokr_w1_a": rnd(2, 3), "lokr_w1_b": rnd(3, 3), "lokr_w2": rnd(4, 5), "alpha": torch.tensor(6.0)}
    close(
        lokr_delta(p, "t"),
        2.0 * slow_kron(slow_matmul(p["lokr_w1_a"], p["lokr_w1_b"]), p["lokr_w2"].double()),
    )
    # both full: LyCORIS uses scale 1 whatever alpha says
    p = {"lokr_w1": rnd(2, 2), "lokr_w2": rnd(3, 3), "alpha": torch.tensor(7.0)}
    close(lokr_delta(p, "t"), slow_kron(p["lokr_w1"], p["lokr_w2"].double()))
    # conv with a Tucker core for w2; w1 broadcast over the kernel
    p = {"lokr_w1": rnd(2, 2), "lokr_t2": rnd(2, 2, 3, 3), "lokr_w2_a": rnd(2, 4), "lokr_w2_b": rnd(2, 3)}
    p["alpha"] = torch.tensor(1.0)
    w2 = slow_tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    close(lokr_delta(p, "t"), 0.5 * slow_kron(p["lokr_w1"], w2))
    # conv without Tucker: w2_b (r, in2, kh, kw)
    p = {"lokr_w1": rnd(2, 2), "lokr_w2_a": rnd(4, 2), "lokr_w2_b": rnd(2, 3, 3, 3)}
    w2 = slow_matmul(p["lokr_w2_a"], p["lokr_w2_b"].flatten(1)).reshape(4, 3, 3, 3)
    close(lokr_delta(p, "t"), slow_kron(p["lokr_w1"], w2))


def test_locon_tucker():
    down, mid, up = rnd(2, 3, 1, 1), rnd(2, 2, 3, 3), rnd(4, 2, 1, 1)
    # mid (a, b) contracts up's rank a and down's rank b: same as the Tucker form with wa = upᵀ, wb = down
    slow = 0.5 * slow_tucker(mid, up.flatten(1).T, down.flatten(1))
    close(locon_tucker_delta(down, mid, up, alpha=1.0), slow)


def test_lycoris_files_load_and_fit_the_model(tiny, tmp_path):
    """Real key layout on tiny SD1.5 modules: a LoHa linear, a flattened LoHa conv, a LoKr linear, a LoCon conv."""
    pipe = tiny("sd15")
    unet = pipe.unet
    q = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").weight.shape
    conv = unet.get_submodule("down_blocks.0.resnets.0.conv1").weight.shape  # (32, 32, 3, 3)
    fc1 = pipe.text_encoder.get_submodule("encoder.layers.0.mlp.fc1").weight.shape  # (64, 32)
    tensors = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a": rnd(q[0], 2),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_b": rnd(2, q[1]),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w2_a": rnd(q[0], 2),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w2_b": rnd(2, q[1]),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(1.0),
        "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": rnd(conv[0], 2),
        "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_b": rnd(2, conv[1] * 9),
        "lora_unet_down_blocks_0_resnets_0_conv1.hada_w2_a": rnd(conv[0], 2),
        "lora_unet_down_blocks_0_resnets_0_conv1.hada_w2_b": rnd(2, conv[1] * 9),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w1": rnd(8, 4),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w2_a": rnd(fc1[0] // 8, 2),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w2_b": rnd(2, fc1[1] // 4),
    }
    save_file(tensors, str(tmp_path / "lyco.safetensors"))
    state = load_lora(tmp_path / "lyco.safetensors")
    assert state.source_format == "lycoris_mixed"
    report = validate_lora(state, pipe, arch="sd15")
    assert report.matched == 3
    for key, module in state.modules.items():
        target = report.targets[key]
        assert module.delta_weight(target.shape).shape == target.shape

    loha_only = {k: v for k, v in tensors.items() if ".hada_" in k or k.endswith(".alpha")}
    save_file(loha_only, str(tmp_path / "loha.safetensors"))
    assert load_lora(tmp_path / "loha.safetensors").source_format == "lycoris_loha"
