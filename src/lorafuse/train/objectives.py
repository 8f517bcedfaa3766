"""Training objectives: what a training step feeds the denoiser and what it regresses to.

One call, `objective.draw(x0, generator)`, draws the timesteps and the noise and returns x_t, the timesteps the
denoiser is called with, and the target. Every training loop in the tree goes through it (`train/loop.py`,
`backbone/train.py`, `world/pretrain.py`, `fusion/ziplora_train.py`); a base family plugs in its own objective.

Draw order, fixed for every objective: timesteps first, then noise, both from `generator` on the CPU (the same
numbers on any device, and a resumable stream). kohya and diffusers draw noise first; lorafuse's LoRA trainer drew
timesteps first before this module existed, and keeping its order keeps every trained LoRA bit-identical.

`DDPMObjective` (SD1.5, SDXL, the world base; Ho et al. 2020, Salimans & Ho 2022 for v):
    ᾱ_t = alphas_cumprod[t], x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε, target ε ("epsilon"),
    v = √ᾱ_t ε − √(1−ᾱ_t) x0 ("v_prediction") or x0 ("sample"). t is an integer in [t_min, t_max).

`FlowMatchObjective` (rectified flow, FLUX.1 and SD3; Esser et al. 2024, "Scaling Rectified Flow Transformers"):
    σ ∈ (0, 1), x_t = (1 − σ) x0 + σ ε, target = ε − x0 (the velocity dx_t/dσ),
    timesteps = 1000 σ, as kohya and diffusers pass them; FLUX's transformer takes `timestep = timesteps / 1000`.
  Timestep samplings (`sampling`), each σ from a u the generator draws:
    "uniform"      σ = u, u ~ U(0, 1)                                   (kohya `--timestep_sampling uniform`)
    "sigmoid"      σ = sigmoid(s·n), n ~ N(0, 1), s = sigmoid_scale      (kohya `sigmoid`, from x-flux)
    "shift"        σ' = sigmoid(s·n), σ = k σ' / (1 + (k − 1) σ'), k = discrete_flow_shift   (kohya `shift`)
    "flux_shift"   σ' = sigmoid(s·n), σ = e^μ / (e^μ + 1/σ' − 1), μ linear in the packed sequence length
                   L = (h/2)(w/2) of the latents: μ(256) = base_shift, μ(4096) = max_shift  (kohya `flux_shift`,
                   the resolution-dependent shift FLUX.1 samples with)
    "logit_normal" u = sigmoid(m + d·n), n ~ N(0, 1), m = logit_mean, d = logit_std   (diffusers
                   `--weighting_scheme logit_normal`, SD3 paper §3.1)
    "mode"         u ~ U(0, 1), u ← 1 − u − c (cos²(πu/2) − 1 + u), c = mode_scale      (diffusers `mode`)
    "discrete"     u ~ U(0, 1)                                           (kohya `sigma` / diffusers `none`)
    "logit_normal", "mode" and "discrete" then index diffusers' discrete schedule as `train_dreambooth_lora_flux.py`
    and kohya's `sigma` sampling do:
    i = ⌊u·T⌋, σ = (T − i)/T, T = 1000 (FlowMatchEulerDiscreteScheduler's training sigmas with dynamic shifting,
    FLUX's config), and with `shift` ≠ 1 the static shift σ ← k σ / (1 + (k − 1) σ) (SD3's config).
  `loss_weighting` is diffusers' `compute_loss_weighting_for_sd3` ("none", "sigma_sqrt", "cosmap").
  `prediction` (kohya's `model_prediction_type`) is what the loss compares with the target ε − x0:
    "raw"           the prediction v̂ itself (diffusers; kohya's recommendation for FLUX.1)
    "additive"      v̂ + x_t                      (kohya)
    "sigma_scaled"  x_t − σ v̂, i.e. the predicted x0 (kohya's default; kohya compares it with ε − x0 as well)

`objective_for(family, scheduler_config, loss, ...)` builds the objective a base family names (`Family.objective`)
from the [loss] table, and refuses the settings that objective does not use, by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from lorafuse.train.timesteps import TimestepBias, noise_like, sample_timesteps

PredictionType = Literal["epsilon", "v_prediction", "sample"]
FlowSampling = Literal["uniform", "sigmoid", "shift", "flux_shift", "logit_normal", "mode", "discrete"]
FlowWeighting = Literal["none", "sigma_sqrt", "cosmap"]
FlowPrediction = Literal["raw", "additive", "sigma_scaled"]


@dataclass
class Noised:
    """One draw: x_t and what goes with it. Shapes: x0, noise, noisy, target (B, C, h, w); timesteps (B,)."""

    noisy: Tensor  # x_t, the denoiser's input
    timesteps: Tensor  # what the denoiser is called with (DDPM: int t; flow: 1000 σ)
    target: Tensor  # what its prediction is regressed to
    noise: Tensor  # ε
    sigmas: Tensor | None = None  # flow: σ (B,)
    weight: Tensor | None = None  # per-sample loss weight (B,) the objective asks for; None = 1

    def rows(self, start: int, end: int) -> Noised:
        """Rows [start, end) of every per-sample field (one process's share of a global batch's draw)."""
        pick = {k: None if v is None else v[start:end] for k, v in vars(self).items()}
        return Noised(**pick)


class Objective(Protocol):
    """What a training loop needs from a base family's objective."""

    def draw(self, x0: Tensor, generator: torch.Generator | None) -> Noised: ...

    def predicted_x0(self, pred: Tensor, noised: Noised) -> Tensor: ...

    def model_output(self, pred: Tensor, noised: Noised) -> Tensor: ...


class DDPMObjective:
    """ε / v / x0 prediction on a DDPM forward process (`alphas_cumprod` from the base's scheduler config)."""

    def __init__(
        self,
        scheduler_config: Any,
        prediction_type: PredictionType | None = None,
        *,
        t_min: int = 0,
        t_max: int | None = None,
        bias: TimestepBias = "none",
        noise_offset: float = 0.0,
        multires: tuple[int, float] = (0, 0.3),
    ) -> None:
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)  # the training-time forward process
        self.prediction_type: PredictionType = prediction_type or self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}")
        self.t_min, self.bias, self.noise_offset, self.multires = t_min, bias, noise_offset, multires
        self.t_max = self.scheduler.config.num_train_timesteps if t_max is None else t_max

    @property
    def alphas_cumprod(self) -> Tensor:
        return self.scheduler.alphas_cumprod

    def draw(self, x0: Tensor, generator: torch.Generator | None) -> Noised:
        t = sample_timesteps(x0.shape[0], generator, t_min=self.t_min, t_max=self.t_max, bias=self.bias)
        t = t.to(x0.device)
        noise = noise_like(x0.float(), generator, self.noise_offset, self.multires).to(x0.device, x0.dtype)
        return self.noised(x0, noise, t)

    def noised(self, x0: Tensor, noise: Tensor, t: Tensor) -> Noised:
        """x_t and the target for given noise and timesteps (fixed draws, e.g. a validation set's)."""
        noisy = self.scheduler.add_noise(x0, noise, t)
        if self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        else:
            target = noise if self.prediction_type == "epsilon" else x0
        return Noised(noisy=noisy, timesteps=t, target=target, noise=noise)

    def model_output(self, pred: Tensor, noised: Noised) -> Tensor:
        """What the loss compares with `noised.target`: the prediction itself."""
        return pred

    def predicted_x0(self, pred: Tensor, noised: Noised) -> Tensor:
        a = self.alphas_cumprod.to(pred)[noised.timesteps].view(-1, *([1] * (pred.dim() - 1)))
        if self.prediction_type == "v_prediction":
            return a.sqrt() * noised.noisy - (1 - a).sqrt() * pred
        if self.prediction_type == "epsilon":
            return (noised.noisy - (1 - a).sqrt() * pred) / a.sqrt()
        return pred


@dataclass(frozen=True)
class FlowMatchObjective:
    """Rectified flow (see the module docstring for every sampling's formula and its origin)."""

    sampling: FlowSampling = "sigmoid"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0  # kohya's default for "shift"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29  # diffusers' default
    shift: float = 1.0  # static shift of "logit_normal"/"mode" (FLUX's scheduler: none; SD3's: 3.0)
    base_shift: float = 0.5  # μ at 256 tokens, FLUX.1's scheduler config
    max_shift: float = 1.15  # μ at 4096 tokens
    loss_weighting: FlowWeighting = "none"
    prediction: FlowPrediction = "raw"
    num_train_timesteps: int = 1000

    def sample_sigmas(
        self, batch: int, generator: torch.Generator | None, latent_hw: tuple[int, int]
    ) -> Tensor:
        """σ (B,) in (0, 1], float32 on the CPU."""
        if self.sampling == "uniform":
            return torch.rand(batch, generator=generator)
        if self.sampling in ("sigmoid", "shift", "flux_shift"):
            sigma = torch.sigmoid(self.sigmoid_scale * torch.randn(batch, generator=generator))
            if self.sampling == "shift":
                k = self.discrete_flow_shift
                return k * sigma / (1 + (k - 1) * sigma)
            if self.sampling == "flux_shift":
                return 1 / (1 + math.exp(-self.flux_mu(latent_hw)) * (1 / sigma - 1))
            return sigma
        if self.sampling in ("logit_normal", "mode", "discrete"):
            from diffusers.training_utils import compute_density_for_timestep_sampling

            scheme = "none" if self.sampling == "discrete" else self.sampling  # "none": u ~ U(0, 1)
            u = compute_density_for_timestep_sampling(
                scheme, batch, self.logit_mean, self.logit_std, self.mode_scale, generator=generator
            )
            n = self.num_train_timesteps
            sigma = (n - (u * n).long()).float() / n
            k = self.shift
            return k * sigma / (1 + (k - 1) * sigma) if k != 1 else sigma
        raise ValueError(f"unknown flow-matching sampling {self.sampling!r}")

    def flux_mu(self, latent_hw: tuple[int, int]) -> float:
        """FLUX's μ: linear in the packed (2x2 patches) sequence length, base_shift at 256, max_shift at 4096."""
        seq_len = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        slope = (self.max_shift - self.base_shift) / (4096 - 256)
        return self.base_shift + slope * (seq_len - 256)

    def draw(self, x0: Tensor, generator: torch.Generator | None) -> Noised:
        sigma = self.sample_sigmas(x0.shape[0], generator, tuple(x0.shape[-2:]))
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        return self._at(x0, noise, sigma)

    def noised(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Noised:
        """x_t and the target for given noise and timesteps t = 1000 σ (fixed draws, e.g. a validation set's)."""
        return self._at(x0, noise, timesteps.float().cpu() / self.num_train_timesteps)

    def _at(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Noised:
        s = sigma.to(x0.device, x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        noisy = (1 - s) * x0 + s * noise
        weight = None
        if self.loss_weighting != "none":
            from diffusers.training_utils import compute_loss_weighting_for_sd3

            weight = compute_loss_weighting_for_sd3(self.loss_weighting, sigma.to(x0.device))
        timesteps = (sigma * self.num_train_timesteps).to(x0.device)
        return Noised(noisy, timesteps, noise - x0, noise, sigmas=sigma.to(x0.device), weight=weight)

    def model_output(self, pred: Tensor, noised: Noised) -> Tensor:
        """What the loss compares with the target ε − x0 (`prediction`, kohya's model_prediction_type)."""
        if self.prediction == "raw":
            return pred
        if self.prediction == "additive":
            return pred + noised.noisy
        assert noised.sigmas is not None
        return noised.noisy - noised.sigmas.to(pred).view(-1, *([1] * (pred.dim() - 1))) * pred

    def predicted_x0(self, pred: Tensor, noised: Noised) -> Tensor:
        assert noised.sigmas is not None
        return noised.noisy - noised.sigmas.to(pred).view(-1, *([1] * (pred.dim() - 1))) * pred


# [loss] settings each objective does not use, with their inactive values and why (a set value is refused)
_DDPM_ONLY = {
    "min_snr_gamma": (None, "Min-SNR weighting needs a DDPM noise schedule (ᾱ_t)"),
    "debiased_estimation_loss": (False, "its SNR weighting needs a DDPM noise schedule (ᾱ_t)"),
    "noise_offset": (0.0, "kohya's FLUX trainer adds no noise offset"),
    "multires_noise_iterations": (0, "kohya's FLUX trainer adds no multires noise"),
    "min_timestep": (0, "σ is drawn by timestep_sampling"),
    "max_timestep": (1000, "σ is drawn by timestep_sampling"),
    "timestep_bias": ("none", "σ is drawn by timestep_sampling"),
}
_FLOW_ONLY = ("timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "model_prediction_type",
              "weighting_scheme", "logit_mean", "logit_std", "mode_scale")  # fmt: skip


def objective_for(
    name: str, scheduler_config: Any, loss: Any, *, v_prediction: bool = False, label: str = ""
) -> DDPMObjective | FlowMatchObjective:
    """The training objective `name` (a family's `objective`: "epsilon" or "flow") from the [loss] table `loss`;
    settings the objective would ignore are refused by name. v_prediction: the DDPM target is v (SD2-v bases)."""
    from dataclasses import fields

    from lorafuse.errors import UserInputError

    defaults = {f.name: f.default for f in fields(loss)}
    label = label or name
    if name == "flow":
        set_ = [(k, why) for k, (off, why) in _DDPM_ONLY.items() if getattr(loss, k) != off]
        if v_prediction:
            set_.append(("model.v_parameterization", "rectified flow predicts the velocity ε − x0 already"))
        if loss.loss_type in ("huber", "smooth_l1") and loss.resolved_huber_schedule == "snr":
            set_.append(("huber_schedule", "'snr' needs a DDPM noise schedule; use constant or exponential"))
        if set_:
            key, why = set_[0]
            raise UserInputError(f"loss.{key} does not apply to {label} (rectified flow): {why}")
        s = loss.timestep_sampling
        scheme = loss.weighting_scheme
        sampling = s if s != "sigma" else (scheme if scheme in ("logit_normal", "mode") else "discrete")
        return FlowMatchObjective(
            sampling, sigmoid_scale=loss.sigmoid_scale, discrete_flow_shift=loss.discrete_flow_shift,
            logit_mean=loss.logit_mean, logit_std=loss.logit_std, mode_scale=loss.mode_scale,
            shift=loss.discrete_flow_shift,  # kohya's `sigma` indexes a table shifted by discrete_flow_shift
            loss_weighting=scheme if scheme in ("sigma_sqrt", "cosmap") else "none",
            prediction=loss.model_prediction_type,
            num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
        )  # fmt: skip
    if name == "epsilon":
        changed = [k for k in _FLOW_ONLY if getattr(loss, k) != defaults[k]]
        if changed:
            raise UserInputError(
                f"loss.{changed[0]} is for flow-matching bases (FLUX.1); {label} trains ε / v-prediction"
            )
        return DDPMObjective(
            scheduler_config, "v_prediction" if v_prediction else "epsilon", t_min=loss.min_timestep,
            t_max=loss.max_timestep, bias=loss.timestep_bias, noise_offset=loss.noise_offset,
            multires=(loss.multires_noise_iterations, loss.multires_noise_discount),
        )  # fmt: skip
    raise ValueError(f"unknown training objective {name!r}")


def uniform_objective(name: str, scheduler_config: Any) -> DDPMObjective | FlowMatchObjective:
    """The objective `name` (a family's `objective`) with the plain forward process: t ~ U{0, …, T − 1} on the
    DDPM schedule, or σ ~ U(0, 1) on rectified flow; no bias, offset or weighting. For methods that compare two
    predictions at the same draw (ZipLoRA's mergers), which read x_t and t but not the target."""
    if name == "flow":
        return FlowMatchObjective("uniform", num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000))
    if name == "epsilon":
        return DDPMObjective(scheduler_config, "epsilon")
    raise ValueError(f"unknown training objective {name!r}")
