import math

import pytest
import torch
from diffusers import DDPMScheduler

from lorafuse.train.losses import (
    diffusion_loss,
    elementwise_loss,
    huber_c_for,
    min_snr_weight,
    warn_inert_huber,
)

ALPHAS = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


def test_huber_is_quadratic_near_zero_and_linear_far():
    p, y = torch.tensor([[0.001, 10.0]]), torch.zeros(1, 2)
    c = torch.tensor([0.1])
    out = elementwise_loss(p, y, "huber", c)[0]
    # pseudo-Huber 2c(√(x²+c²) − c) ≈ x² near 0 and ≈ 2c|x| far away
    assert out[0].item() == pytest.approx(0.001**2, rel=1e-2)  # float32 cancellation near 0
    assert out[1].item() == pytest.approx(2 * 0.1 * (math.sqrt(100 + 0.01) - 0.1), rel=1e-6)
    assert elementwise_loss(p, y, "smooth_l1", c)[0, 1].item() == pytest.approx(2 * (math.sqrt(100.01) - 0.1), rel=1e-6)


def test_huber_c_schedules_match_spec_formulas():
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(huber_c_for(t, ALPHAS, 0.1, "constant"), torch.full((3,), 0.1))
    exp = huber_c_for(t, ALPHAS, 0.1, "exponential")
    assert torch.allclose(exp, torch.exp(-(-math.log(0.1) / 1000) * t.float()))
    snr = huber_c_for(t, ALPHAS, 0.1, "snr")
    sigma = ((1 - ALPHAS[t]) / ALPHAS[t]).sqrt()
    assert torch.allclose(snr, (1 - 0.1) / (1 + sigma) ** 2 + 0.1)
    assert snr[0] > snr[2], "snr schedule: clean timesteps get a larger c (more L2-like)"


def test_min_snr_weight():
    t = torch.tensor([10, 900])
    snr = ALPHAS[t] / (1 - ALPHAS[t])
    w = min_snr_weight(t, ALPHAS, 5.0)
    assert torch.allclose(w, torch.clamp(snr, max=5) / snr)
    assert w[0] < 1 and w[1] == pytest.approx(1.0)
    assert torch.allclose(min_snr_weight(t, ALPHAS, 5.0, v_prediction=True), torch.clamp(snr, max=5) / (snr + 1))


def test_diffusion_loss_l2_equals_mse_and_weights_apply():
    g = torch.Generator().manual_seed(0)
    p, y = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([1, 200, 600, 999])
    assert diffusion_loss(p, y, t, ALPHAS).item() == pytest.approx(torch.nn.functional.mse_loss(p, y).item(), rel=1e-6)
    weighted = diffusion_loss(p, y, t, ALPHAS, min_snr_gamma=5.0)
    manual = (((p - y) ** 2).mean((1, 2, 3)) * min_snr_weight(t, ALPHAS, 5.0)).mean()
    assert weighted.item() == pytest.approx(manual.item(), rel=1e-6)
    assert diffusion_loss(p, y, t, ALPHAS, loss_type="huber").item() != pytest.approx(weighted.item())


def test_warns_when_huber_options_are_inert():
    with pytest.warns(UserWarning, match="no effect"):
        warn_inert_huber("l2", 0.3, "snr")


def test_debiased_estimation_weights_each_sample_by_one_over_root_snr():
    """kohya's debiased_estimation_loss, from its definition: SNR = ᾱ/(1 − ᾱ) capped at 1000, weight 1/√SNR
    (v-prediction 1/(SNR + 1)); a hand loop over the batch."""
    from lorafuse.config.toml_io import config_from_dict
    from lorafuse.train.config import TrainConfig
    from lorafuse.train.kohya_import import convert_flat

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    for v in (False, True):
        got = diffusion_loss(pred, target, t, ALPHAS, debiased=True, v_prediction=v)
        expected = 0.0
        for i in range(4):
            a = ALPHAS[t[i]].double()
            snr = min(float(a / (1 - a)), 1000.0)
            w = 1 / (snr + 1) if v else 1 / math.sqrt(snr)
            expected += w * float(((pred[i] - target[i]) ** 2).mean()) / 4
        assert got.item() == pytest.approx(expected, rel=1e-5)
    assert diffusion_loss(pred, target, t, ALPHAS).item() == pytest.approx(float(((pred - target) ** 2).mean()))
    imp = convert_flat({"pretrained_model_name_or_path": "sd15-tiny", "train_data_dir": "d",
                        "debiased_estimation_loss": True})  # fmt: skip
    assert config_from_dict(TrainConfig, imp.data, "<kohya>").loss.debiased_estimation_loss


def test_multires_noise_adds_low_frequencies_at_unit_std():
    """kohya's multires (pyramid) noise: unit standard deviation, neighbouring latents correlated (plain noise:
    not), more so with a larger discount; reproducible from the generator; mapped from kohya's keys."""
    from lorafuse.config.toml_io import config_from_dict
    from lorafuse.train.config import TrainConfig
    from lorafuse.train.kohya_import import convert_flat
    from lorafuse.train.timesteps import noise_like

    x = torch.zeros(4, 4, 64, 64)

    def neighbour_corr(n):
        a, b = n[..., :, :-1].flatten(), n[..., :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    plain = noise_like(x, torch.Generator().manual_seed(0))
    strong = noise_like(x, torch.Generator().manual_seed(0), multires=(6, 0.8))
    weak = noise_like(x, torch.Generator().manual_seed(0), multires=(6, 0.1))
    assert abs(neighbour_corr(plain)) < 0.02
    assert neighbour_corr(strong) > 0.2 and abs(neighbour_corr(weak)) < 0.05  # discount 0.1: nearly plain
    assert float(strong.std()) == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(strong, noise_like(x, torch.Generator().manual_seed(0), multires=(6, 0.8)))
    imp = convert_flat({"pretrained_model_name_or_path": "sd15-tiny", "train_data_dir": "d", "noise_offset_type": "Multires",
                        "multires_noise_iterations": 6, "multires_noise_discount": 0.3})  # fmt: skip
    assert not imp.refused
    loss = config_from_dict(TrainConfig, imp.data, "<kohya>").loss
    assert (loss.multires_noise_iterations, loss.multires_noise_discount) == (6, 0.3)
