"""Training objectives against their formulas written out by hand (and diffusers' discrete flow schedule)."""

from __future__ import annotations

import math

import pytest
import torch

from lorafuse.train.objectives import DDPMObjective, FlowMatchObjective
from lorafuse.train.timesteps import sample_timesteps

SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


def _x0(b: int = 6, hw: int = 8) -> torch.Tensor:
    return torch.randn(b, 4, hw, hw, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_ddpm_draw_is_the_forward_process(prediction):
    obj = DDPMObjective(SCHEDULER, prediction, noise_offset=0.0)
    x0 = _x0()
    n = obj.draw(x0, torch.Generator().manual_seed(3))
    # timesteps first, then noise, from the one generator
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    assert torch.equal(n.timesteps, t) and torch.equal(n.noise, eps)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(n.noisy.double(), abar.sqrt() * x0 + (1 - abar).sqrt() * eps, rtol=0, atol=1e-5)
    expected = {"epsilon": eps, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0, "sample": x0}[prediction]
    torch.testing.assert_close(n.target.double(), expected.double(), rtol=0, atol=1e-5)
    # a perfect prediction gives back x0
    torch.testing.assert_close(obj.predicted_x0(n.target, n), x0, rtol=0, atol=2e-3)


def test_ddpm_keeps_the_lora_trainers_stream():
    """Bias, range and noise offset are the ones `sample_timesteps`/`noise_like` draw, in that order."""
    obj = DDPMObjective(SCHEDULER, t_min=100, t_max=400, bias="content", noise_offset=0.1)
    n = obj.draw(_x0(), torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(n.timesteps, sample_timesteps(6, g, t_min=100, t_max=400, bias="content"))
    eps = torch.randn(_x0().shape, generator=g)
    eps = eps + 0.1 * torch.randn(6, 4, 1, 1, generator=g)
    assert torch.equal(n.noise, eps)


def _flow_sigmas(obj: FlowMatchObjective, b: int, hw: tuple[int, int], seed: int) -> torch.Tensor:
    """Each sampling's σ, written out from kohya's and diffusers' code paths."""
    g = torch.Generator().manual_seed(seed)
    s = obj.sampling
    if s == "uniform":
        return torch.rand(b, generator=g)
    if s in ("sigmoid", "shift", "flux_shift"):
        sig = 1 / (1 + torch.exp(-obj.sigmoid_scale * torch.randn(b, generator=g)))
        if s == "shift":
            k = obj.discrete_flow_shift
            return sig * k / (1 + (k - 1) * sig)
        if s == "flux_shift":
            tokens = (hw[0] // 2) * (hw[1] // 2)
            mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
            return math.exp(mu) / (math.exp(mu) + (1 / sig - 1))
        return sig
    from diffusers import FlowMatchEulerDiscreteScheduler

    if s == "logit_normal":
        u = 1 / (1 + torch.exp(-torch.normal(obj.logit_mean, obj.logit_std, (b,), generator=g)))
    else:  # mode
        u = torch.rand(b, generator=g)
        u = 1 - u - obj.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    table = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=obj.shift).sigmas
    return table[(u * 1000).long()]


FLOWS = [
    FlowMatchObjective("uniform"),
    FlowMatchObjective("sigmoid", sigmoid_scale=1.5),
    FlowMatchObjective("shift", sigmoid_scale=1.0, discrete_flow_shift=3.1582),
    FlowMatchObjective("flux_shift"),
    FlowMatchObjective("logit_normal", logit_mean=0.3, logit_std=1.2),
    FlowMatchObjective("logit_normal", shift=3.0),
    FlowMatchObjective("mode", mode_scale=1.29),
]


@pytest.mark.parametrize("obj", FLOWS, ids=lambda o: f"{o.sampling}-shift{o.shift}")
@pytest.mark.parametrize("hw", [8, 32])
def test_flow_matching_draw_matches_the_formulas(obj, hw):
    x0 = _x0(64, hw)
    n = obj.draw(x0, torch.Generator().manual_seed(11))
    sigma = _flow_sigmas(obj, 64, (hw, hw), 11)
    torch.testing.assert_close(n.sigmas, sigma, rtol=1e-6, atol=1e-7)
    g = torch.Generator().manual_seed(11)
    obj.sample_sigmas(64, g, (hw, hw))  # σ first, then the noise
    eps = torch.randn(x0.shape, generator=g)
    assert torch.equal(n.noise, eps)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(n.noisy, (1 - s) * x0 + s * eps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(n.target, eps - x0)
    torch.testing.assert_close(n.timesteps, sigma * 1000)
    assert ((n.sigmas > 0) & (n.sigmas <= 1)).all()
    torch.testing.assert_close(obj.predicted_x0(n.target, n), x0, rtol=1e-5, atol=1e-5)


def test_flux_shift_mu_at_the_configs_anchor_points():
    obj = FlowMatchObjective("flux_shift")
    assert obj.flux_mu((32, 32)) == pytest.approx(0.5)  # 256 tokens
    assert obj.flux_mu((128, 128)) == pytest.approx(1.15)  # 4096 tokens: 1024x1024 images
    # a larger image is shifted toward noise: its median σ is higher
    small = obj.sample_sigmas(4000, torch.Generator().manual_seed(0), (32, 32)).median()
    large = obj.sample_sigmas(4000, torch.Generator().manual_seed(0), (128, 128)).median()
    assert small == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.03) and large > small + 0.1


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_flow_loss_weighting(scheme):
    n = FlowMatchObjective("uniform", loss_weighting=scheme).draw(_x0(), torch.Generator().manual_seed(2))
    s = n.sigmas
    expected = s**-2 if scheme == "sigma_sqrt" else 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    torch.testing.assert_close(n.weight, expected)
    assert FlowMatchObjective("uniform").draw(_x0(), None).weight is None


def test_unknown_sampling_is_named():
    with pytest.raises(ValueError, match="bogus"):
        FlowMatchObjective("bogus").draw(_x0(), None)  # type: ignore[arg-type]


def _kohya_sigmas(loss, b: int, hw: tuple[int, int], seed: int) -> torch.Tensor:
    """kohya's `get_noisy_model_input_and_timesteps` (flux_train_utils.py) for each timestep_sampling, by hand."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    g = torch.Generator().manual_seed(seed)
    s = loss.timestep_sampling
    if s == "uniform":
        return torch.rand(b, generator=g)
    if s == "sigma":  # a table built with shift = discrete_flow_shift, indexed by u from the weighting scheme
        u = compute_density_for_timestep_sampling(
            loss.weighting_scheme, b, loss.logit_mean, loss.logit_std, loss.mode_scale, generator=g
        )
        table = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=loss.discrete_flow_shift).sigmas
        return table[(u * 1000).long()]
    t = torch.sigmoid(torch.randn(b, generator=g) * loss.sigmoid_scale)
    if s == "shift":
        k = loss.discrete_flow_shift
        return (t * k) / (1 + (k - 1) * t)
    if s == "flux_shift":
        x = (hw[0] // 2) * (hw[1] // 2)
        mu = (1.15 - 0.5) / (4096 - 256) * x + (0.5 - (1.15 - 0.5) / (4096 - 256) * 256)
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    return t  # sigmoid


KOHYA_LOSSES = [
    {"timestep_sampling": "sigma"},
    {"timestep_sampling": "sigma", "discrete_flow_shift": 1.0},  # diffusers' FLUX script: no static shift
    {"timestep_sampling": "sigma", "weighting_scheme": "logit_normal", "logit_mean": 0.2, "logit_std": 1.3},
    {"timestep_sampling": "sigma", "weighting_scheme": "mode", "mode_scale": 1.1},
    {"timestep_sampling": "uniform"},
    {"timestep_sampling": "sigmoid", "sigmoid_scale": 2.0},
    {"timestep_sampling": "shift", "discrete_flow_shift": 3.1582},
    {"timestep_sampling": "flux_shift", "sigmoid_scale": 0.8},
]


@pytest.mark.parametrize("settings", KOHYA_LOSSES, ids=lambda s: "-".join(map(str, s.values())))
def test_loss_table_builds_kohyas_timestep_sampling(settings):
    from lorafuse.train.config_optim import LossConfig
    from lorafuse.train.objectives import objective_for

    loss = LossConfig(**settings)
    obj = objective_for("flow", {"num_train_timesteps": 1000}, loss)
    for hw in ((8, 8), (64, 96)):
        got = obj.sample_sigmas(256, torch.Generator().manual_seed(4), hw)
        torch.testing.assert_close(got, _kohya_sigmas(loss, 256, hw, 4), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction", ["raw", "additive", "sigma_scaled"])
@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_model_prediction_type_and_loss_weighting(prediction, scheme):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    from lorafuse.train.config_optim import LossConfig
    from lorafuse.train.objectives import objective_for

    loss = LossConfig(timestep_sampling="uniform", model_prediction_type=prediction, weighting_scheme=scheme)
    obj = objective_for("flow", {}, loss)
    x0 = _x0()
    n = obj.draw(x0, torch.Generator().manual_seed(1))
    pred = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    s = n.sigmas.view(-1, 1, 1, 1)
    # kohya's apply_model_prediction_type; the target stays ε − x0 in every case
    expected = {"raw": pred, "additive": pred + n.noisy, "sigma_scaled": pred * (-s) + n.noisy}[prediction]
    torch.testing.assert_close(obj.model_output(pred, n), expected)
    torch.testing.assert_close(n.target, n.noise - x0)
    if scheme == "none":
        assert n.weight is None
    else:
        torch.testing.assert_close(n.weight, compute_loss_weighting_for_sd3(scheme, n.sigmas))


def test_ddpm_objective_from_the_loss_table():
    from lorafuse.train.config_optim import LossConfig
    from lorafuse.train.objectives import objective_for

    loss = LossConfig(min_timestep=100, max_timestep=400, timestep_bias="content", noise_offset=0.1)
    obj = objective_for("epsilon", SCHEDULER, loss, v_prediction=True)
    assert isinstance(obj, DDPMObjective) and obj.prediction_type == "v_prediction"
    assert (obj.t_min, obj.t_max, obj.bias, obj.noise_offset) == (100, 400, "content", 0.1)
    pred = torch.ones(2, 4, 8, 8)
    assert obj.model_output(pred, obj.draw(torch.zeros(2, 4, 8, 8), None)) is pred
