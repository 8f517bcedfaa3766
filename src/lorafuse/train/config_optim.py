"""The [optimizer], [scheduler] and [loss] tables of `TrainConfig` (kohya sd-scripts names and defaults)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

from lorafuse.config.checks import bad as _bad
from lorafuse.config.checks import check_positive as _positive
from lorafuse.errors import UserInputError

HUBER_C_DEFAULT = 0.1  # kohya's default huber_c
HUBER_SCHEDULE_DEFAULT = "snr"  # kohya's default huber_schedule


@dataclass(frozen=True)
class OptimizerConfig:
    # AdamW (torch), AdamW8bit / PagedAdamW8bit / Lion / Lion8bit (bitsandbytes), Adafactor (transformers), Prodigy
    # (prodigyopt); Lion takes a 3-10x smaller learning_rate than AdamW and betas (0.9, 0.99) in its paper
    optimizer_type: Literal["AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion", "Lion8bit", "Adafactor", "Prodigy"] = "AdamW"
    # peak learning rate (of both parts unless unet_lr / text_encoder_lr are set)
    learning_rate: float = 1e-4
    unet_lr: float | None = None  # None: learning_rate
    text_encoder_lr: float | None = None  # None: learning_rate
    # decoupled weight decay
    weight_decay: float = 0.01
    # Adam betas
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0  # 0 disables clipping, as in kohya
    # LoRA+: the B (up) factors train at this times the LR (kohya's networks.lora; 16 is the paper's suggestion)
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None  # LoRA+ ratio of the denoiser (UNet / transformer) only
    loraplus_text_encoder_lr_ratio: float | None = None  # LoRA+ ratio of the text encoders only
    # after each step, scale down every LoRA whose ΔW has a Frobenius norm above this (kohya's max-norm; 1 typical)
    scale_weight_norms: float | None = None
    # further constructor arguments of the optimizer (kohya's optimizer_args), e.g. Prodigy's
    # {decouple = true, d_coef = 2, use_bias_correction = true, safeguard_warmup = true}; checked against the class;
    # lr, weight_decay and betas are the fields above
    optimizer_args: dict[str, bool | int | float | str | list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive(self, "learning_rate", "unet_lr", "text_encoder_lr", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                  "loraplus_text_encoder_lr_ratio", "scale_weight_norms")  # fmt: skip
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise _bad(
                "weight_decay",
                f"and max_grad_norm must be >= 0, got {self.weight_decay}, {self.max_grad_norm}",
            )
        if not all(0 <= b < 1 for b in self.betas):
            raise _bad("betas", f"must each be in [0, 1), got {list(self.betas)}")
        self._check_optimizer_args()
        if self.optimizer_type == "Prodigy" and self.learning_rate < 0.1:
            # Prodigy estimates the step size itself; its lr is a multiplier that should stay near 1.
            warnings.warn(f"Prodigy expects learning_rate near 1.0, got {self.learning_rate}", stacklevel=3)

    def _check_optimizer_args(self) -> None:
        """Against the optimizer's signature now, so a bad argument fails with the config file named and before
        any model loads (kohya's would fail in the optimizer's constructor or, for a wrong type, mid-step)."""
        if not self.optimizer_args:
            return
        from lorafuse.train.optim import checked_optimizer_args
        from lorafuse.utils.extras import MissingExtraError

        try:
            checked_optimizer_args(self.optimizer_type, self.optimizer_args)
        except MissingExtraError:
            pass  # the run's optimizer check names the extra to install, before any model loads
        except UserInputError as e:
            raise _bad("optimizer_args", str(e)) from None


@dataclass(frozen=True)
class SchedulerConfig:
    # learning-rate schedule over the optimizer steps (diffusers' get_scheduler)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int | float = 0  # optimizer steps, or a float < 1 as a fraction of the total steps
    lr_scheduler_num_cycles: int = 1  # hard restarts of cosine_with_restarts
    lr_scheduler_power: float = 1.0  # polynomial

    def __post_init__(self) -> None:
        w = self.lr_warmup_steps
        if isinstance(w, float) and not 0.0 <= w < 1.0:
            raise _bad("lr_warmup_steps", f"as a fraction must be in [0, 1), got {w}; write an int for steps")
        if w < 0:
            raise _bad("lr_warmup_steps", f"must be >= 0, got {w}")
        _positive(self, "lr_scheduler_num_cycles", "lr_scheduler_power")
        if self.lr_scheduler == "constant" and w:
            msg = "lr_warmup_steps is ignored by lr_scheduler = 'constant'; use 'constant_with_warmup'"
            warnings.warn(msg, stacklevel=3)

    def warmup_steps(self, total_steps: int) -> int:
        """Warm-up in optimizer steps; a fraction is taken of `total_steps` and rounded down, as kohya does."""
        w = self.lr_warmup_steps
        return int(w * total_steps) if isinstance(w, float) else w


@dataclass(frozen=True)
class LossConfig:
    # l2 (MSE), l1, huber (pseudo-Huber) or smooth_l1, on the ε or v prediction
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = "l2"
    # None = not set (kohya's 0.1 / 'snr' apply), so that setting either with l2 or l1 can be warned about.
    huber_c: float | None = None
    # how c changes with the timestep: constant, exponential, snr
    huber_schedule: Literal["constant", "exponential", "snr"] | None = None
    min_snr_gamma: float | None = None  # 5 is typical
    # weight each sample's loss by 1/√SNR(t) (v-prediction: 1/(SNR+1)), SNR capped at 1000, as kohya's
    # debiased_estimation_loss (Yu et al. 2024, "Debias the Training of Diffusion Models")
    debiased_estimation_loss: bool = False
    # kohya's noise offset: a per-channel constant added to the noise (SDXL base used 0.0357)
    noise_offset: float = 0.0
    # kohya's multires (pyramid) noise: levels of lower-resolution noise added (6-10 typical; 0 = off) ...
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3  # ... each level weighted by discount^level
    # smallest training timestep (inclusive)
    min_timestep: int = 0
    # largest training timestep (exclusive)
    max_timestep: int = 1000
    # sample noisy timesteps more often (content) or clean ones (style), cubic bias
    timestep_bias: Literal["none", "content", "style"] = "none"
    # every image has a loss mask (dataset alpha_mask, or the subsets' mask_dir), checked before training;
    # masks apply whenever a subset has one, as kohya's masked_loss / alpha_mask
    masked_loss: bool = False
    # --- flow-matching bases (FLUX.1); names and meanings of kohya's flux_train_network.py --------------------
    # how σ is drawn: sigma (the discrete schedule shifted by discrete_flow_shift, u from weighting_scheme),
    # uniform, sigmoid, shift (sigmoid then discrete_flow_shift), flux_shift (sigmoid then FLUX's
    # resolution-dependent shift); train/objectives.py has the formulas
    timestep_sampling: Literal["sigma", "uniform", "sigmoid", "shift", "flux_shift"] = "sigma"
    # scale s of sigmoid(s * n), n ~ N(0, 1) (sigmoid, shift, flux_shift)
    sigmoid_scale: float = 1.0
    # static shift k of σ -> k σ / (1 + (k - 1) σ) (shift, sigma); 1 = none (diffusers' FLUX script)
    discrete_flow_shift: float = 3.0
    # what the loss compares with the velocity target ε - x0: raw (the prediction), additive (+ x_t),
    # sigma_scaled (x_t - σ·prediction, kohya's default; kohya's FLUX guide recommends raw, our default)
    model_prediction_type: Literal["raw", "additive", "sigma_scaled"] = "raw"
    # diffusers' weighting_scheme: logit_normal / mode draw u for timestep_sampling = sigma; sigma_sqrt / cosmap
    # weight the loss (with any model_prediction_type; kohya weights only with sigma_scaled)
    weighting_scheme: Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"] = "none"
    logit_mean: float = 0.0  # of weighting_scheme logit_normal
    logit_std: float = 1.0  # of weighting_scheme logit_normal
    mode_scale: float = 1.29  # of weighting_scheme mode

    def __post_init__(self) -> None:
        if self.huber_c is not None and not 0 < self.huber_c <= 1:
            raise _bad("huber_c", f"must be in (0, 1], got {self.huber_c}")
        _positive(self, "min_snr_gamma", "sigmoid_scale", "discrete_flow_shift", "logit_std")
        if self.noise_offset < 0:
            raise _bad("noise_offset", f"must be >= 0, got {self.noise_offset}")
        if self.multires_noise_iterations < 0 or not 0 < self.multires_noise_discount <= 1:
            raise _bad("multires_noise_iterations", "must be >= 0 and multires_noise_discount in (0, 1]")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            got = f"{self.min_timestep}, {self.max_timestep}"
            raise _bad("min_timestep", f"and max_timestep must satisfy 0 <= min < max <= 1000, got {got}")
        if self.loss_type in ("l2", "l1") and (self.huber_c is not None or self.huber_schedule is not None):
            msg = f"huber_c / huber_schedule have no effect with loss_type = '{self.loss_type}' (use 'huber' or 'smooth_l1')"
            warnings.warn(msg, stacklevel=3)

    @property
    def resolved_huber_c(self) -> float:
        return HUBER_C_DEFAULT if self.huber_c is None else self.huber_c

    @property
    def resolved_huber_schedule(self) -> str:
        return HUBER_SCHEDULE_DEFAULT if self.huber_schedule is None else self.huber_schedule
