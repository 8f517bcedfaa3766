"""Train the rank-limited backbone W' on contrastive pairs (CRAFT-LoRA App. A.2; docs/algorithms.md §7.1).

    L = E‖ε − ε_{W'}(z_t, t, c)‖² + λ_p L_perc(x̂_0, x_0)

Notation map: `lambda_p` is λ_p (0.1); x̂_0 is the clean image predicted from (z_t, ε̂), decoded by the frozen VAE;
L_perc is `features.perceptual_loss` over a pluggable feature network (`features`). Per pair, the content-fixed
image's loss reaches only the content bases B_c and the style-fixed image's only B_s (`para.trainable_bases`),
both through the merged projection; one optimizer step per batch of pairs. For v-prediction models the MSE
target is the velocity and x̂_0 = √ᾱ z_t − √(1−ᾱ) v̂.

Defaults follow App. A.2 where the extraction kept them (AdamW, cosine decay with 500 warm-up steps, batch 8,
5000 steps, λ_p = 0.1, r_max 128 / r_min 4 scaled to the model); the learning rates were lost, so ours are a
guess: 1e-4 decaying to 1% of it. The frozen VAE, text encoder and pairs are encoded once up front (latents are
the posterior means, so a resumed run sees the same data).

Output folder:
    backbone/           W' as a full diffusers pipeline (loads with DiffusionPipeline.from_pretrained), plus
                        craft_backbone.json (ranks per layer, steps, settings)
    bases.safetensors   the final B_c, B_s (small; W' can be rebuilt from the base and these)
    log.csv             step, lr, losses
    checkpoints/step-NNNNNN-state/   resumable states (train.checkpoint format), every save_every_n_steps
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from lorafuse.backbone import para
from lorafuse.backbone.features import load_features, perceptual_loss
from lorafuse.backbone.pairs import read_pairs
from lorafuse.errors import ConfigError, UserInputError
from lorafuse.families.unet import UNetDenoiser
from lorafuse.train.objectives import DDPMObjective, Objective
from lorafuse.utils.atomic import atomic_folder, atomic_save_safetensors, atomic_write_text, check_output

INFO_FILE = "craft_backbone.json"  # = fusion.craft.host.BACKBONE_INFO
# settings a resumed run may change (where and how often it writes, how long it runs)
RESUME_FREE = {"output_dir", "steps", "save_every_n_steps", "resume", "log_every"}


@dataclass
class BackboneConfig:
    pairs: Path
    output_dir: Path
    base: str = "world"
    steps: int = 5000
    batch_size: int = 8
    learning_rate: float = 1e-4
    min_lr_ratio: float = 0.01
    warmup_steps: int = 500
    weight_decay: float = 0.01
    r_max: int = 128
    r_min: int = 4
    reference_width: int = 1280
    exclude_cross_attention: bool = False
    layers: list[str] | None = None
    init_std: float | None = None
    lambda_p: float = 0.1
    features: str = "auto"  # see backbone/features.py; auto = world-oracle on the world base, else an error
    seed: int = 0
    save_every_n_steps: int = 0
    resume: bool = True
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every_n_steps", "log_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not (self.learning_rate > 0 and 0 <= self.min_lr_ratio <= 1 and self.lambda_p >= 0):
            raise ConfigError("learning_rate must be > 0, min_lr_ratio in [0, 1] and lambda_p >= 0")
        try:
            self.para_options()
        except UserInputError as e:
            raise ConfigError(str(e)) from None

    def para_options(self) -> para.ParaOptions:
        return para.ParaOptions(
            r_max=self.r_max, r_min=self.r_min, reference_width=self.reference_width,
            exclude_cross_attention=self.exclude_cross_attention,
            layers=tuple(self.layers) if self.layers is not None else None, init_std=self.init_std,
        )  # fmt: skip


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total` (the paper's schedule with a floor)."""
    # Not transformers' cosine-with-min-lr schedule: its warm-up starts at 0/warmup (an idle first step), ours at
    # 1/warmup, and every trained backbone's figures depend on this exact curve.
    if step < warmup:
        return (step + 1) / warmup
    u = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * u))


# --- data -------------------------------------------------------------------------------------------------


def _load_image(path: Path, size: int) -> torch.Tensor:
    image = Image.open(path).convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return (
        torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1
    )  # (3, H, W) in [-1, 1]


def encode_images(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> latents as the UNet sees them (scaled; SDXL-style mean/std when configured)."""
    z = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(z)
        std = torch.tensor(std).view(1, -1, 1, 1).to(z)
        return (z - mean) * config.scaling_factor / std
    return z * config.scaling_factor


def decode_latents(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """The inverse of `encode_images`, differentiable (gradients reach z through the frozen decoder)."""
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        z = z * torch.tensor(std).view(1, -1, 1, 1).to(z) / config.scaling_factor + torch.tensor(mean).view(
            1, -1, 1, 1
        ).to(z)
    else:
        z = z / config.scaling_factor
    return vae.decode(z.to(vae.dtype)).sample


@dataclass
class PairData:
    """Everything the loop draws from, computed once. Rows are pairs (N)."""

    latents: dict[str, torch.Tensor]  # role -> (N, C, h, w)
    images: dict[str, torch.Tensor] | None  # role -> (N, 3, H, W) in [-1, 1]; None without a perceptual term
    cond: Any  # guidance.base.Conditioning with N rows (one caption per pair)


@torch.no_grad()
def prepare_data(pipe: Any, folder: Path, keep_images: bool) -> PairData:
    from lorafuse.fusion.prompts import encode_prompts

    pairs = read_pairs(folder)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    latents, images = {}, {}
    for role, attr in (("content", "content_image"), ("style", "style_image")):
        x = torch.stack([_load_image(folder / getattr(p, attr), size) for p in pairs])
        latents[role] = torch.cat([encode_images(pipe.vae, x[k : k + 16]) for k in range(0, len(x), 16)])
        images[role] = x
    cond = encode_prompts(pipe, [p.caption for p in pairs], None, num_images=1, clip_skip=0, height=size,
                          width=size).cond  # fmt: skip
    return PairData(latents, images if keep_images else None, cond)


# --- loss -------------------------------------------------------------------------------------------------


def backbone_loss(
    pipe: Any, objective: Objective, data: PairData, rows: torch.Tensor, role: str, generator: torch.Generator,
    features: Any, lambda_p: float,
) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """Noise MSE (+ λ_p L_perc) of the `role` images of pairs `rows`; gradients reach only the `role` bases."""
    unet = pipe.unet
    z0 = data.latents[role][rows].to(unet.device)
    noised = objective.draw(z0, generator)
    with para.trainable_bases(unet, role):
        pred = UNetDenoiser(unet)(noised.noisy, noised.timesteps.to(unet.device), data.cond.rows(rows))
    mse = F.mse_loss(pred.float(), noised.target.float())
    logs = {"mse": float(mse.detach())}
    if features is None or lambda_p == 0:
        return mse, logs
    x0_latent = objective.predicted_x0(pred, noised)
    x0 = decode_latents(pipe.vae, x0_latent)
    perc = perceptual_loss(features, x0.float(), data.images[role][rows].to(x0.device))
    logs["perc"] = float(perc.detach())
    return mse + lambda_p * perc, logs


# --- the loop ---------------------------------------------------------------------------------------------


def _config_dict(config: BackboneConfig) -> dict[str, Any]:
    from lorafuse.config.toml_io import config_to_dict

    return config_to_dict(config)


def _latest_state(folder: Path) -> Path | None:
    states = sorted((folder / "checkpoints").glob("step-*-state"))
    return states[-1] if states else None


def _check_resume(saved: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    diffs = [
        f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if k not in RESUME_FREE and saved.get(k) != current.get(k)
    ]
    if diffs:
        raise UserInputError(
            f"{source}: this state was trained with other settings ({'; '.join(diffs[:4])}); resume with the "
            "same settings, or set resume = false to start over"
        )


def _resume(
    out: Path, config: BackboneConfig, current: dict[str, Any], pipe: Any, optimizer: Any, schedule: Any,
    generator: torch.Generator,
) -> tuple[int, list[str]]:  # fmt: skip
    """Restore the latest state under `out` (when `config.resume`); returns (step, the log's lines up to it)."""
    from lorafuse.train import checkpoint as ckpt

    state = _latest_state(out) if config.resume else None
    if state is None:
        return 0, []
    saved = ckpt.read_train_state(state)
    _check_resume(saved.config.get("backbone", {}), current, state)
    ckpt.restore_train_state(saved, load_lora=lambda t, src: para.load_bases(pipe.unet, t, src),
                             optimizer=optimizer, lr_scheduler=schedule, generator=generator)  # fmt: skip
    step = saved.progress.global_step
    if not (out / "log.csv").is_file():
        return step, []
    lines = (out / "log.csv").read_text().splitlines()[1:]
    return step, [line for line in lines if int(line.split(",")[0]) <= step]


def train_backbone(config: BackboneConfig, *, pipe: Any = None, progress: bool = True) -> Path:
    """Train W' as configured; returns the saved pipeline folder (`output_dir/backbone`).

    pipe: an already loaded base pipeline (else `config.base` is loaded); it is modified (its UNet becomes W').
    """
    from lorafuse.train import checkpoint as ckpt
    from lorafuse.train.optim import make_optimizer

    # 1. Check inputs and load: pairs, base, feature network
    read_pairs(config.pairs)  # a missing or broken dataset fails before any model loads
    out, sized = _check_output_dir(config, pipe)
    if pipe is None:
        from lorafuse.models.load import load_base_pipeline

        pipe = load_base_pipeline(str(config.base))
    if not sized:  # a base whose configs do not tell its shapes: sized now, before any step
        check_output(out, kind="folder", what=OUTPUT, estimate=estimate_backbone_bytes(config, pipe.components))
    features = load_features(_feature_spec(config.features, pipe)) if config.lambda_p > 0 else None
    for module in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False).eval()

    # 2. Constrain the tuned layers and cache the data
    ranks = para.apply_para(pipe.unet, config.para_options(), seed=config.seed)
    pipe.unet.eval()  # no dropout in diffusers UNets; eval keeps runs deterministic
    data = prepare_data(pipe, Path(config.pairs), keep_images=features is not None)
    objective = DDPMObjective(pipe.scheduler.config)

    # 3. Optimizer, schedule, resume
    params = para.bases(pipe.unet)
    optimizer = make_optimizer("AdamW", [{"params": list(params.values())}], config.learning_rate,
                               weight_decay=config.weight_decay)  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, config.steps, config.min_lr_ratio)
    )
    generator = torch.Generator().manual_seed(config.seed)
    current = _config_dict(config)
    step, log = _resume(out, config, current, pipe, optimizer, schedule, generator)

    # 4. The loop: per batch of pairs, content images train B_c, style images B_s
    n = len(data.cond)
    bar = tqdm(total=config.steps, initial=step, desc="backbone", disable=not progress)
    while step < config.steps:
        rows = torch.randperm(n, generator=generator)[: config.batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss_c, logs_c = backbone_loss(
            pipe, objective, data, rows, "content", generator, features, config.lambda_p
        )
        loss_s, logs_s = backbone_loss(
            pipe, objective, data, rows, "style", generator, features, config.lambda_p
        )
        loss = loss_c + loss_s
        if not torch.isfinite(loss.detach()):
            raise UserInputError(
                f"backbone training diverged at step {step} (loss {float(loss.detach())}); lower learning_rate"
            )
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        log.append(f"{step},{schedule.get_last_lr()[0]:.6g},{float(loss_c.detach()):.6g},{float(loss_s.detach()):.6g},"
                   f"{logs_c.get('perc', 0) + logs_s.get('perc', 0):.6g}")  # fmt: skip
        bar.update(1)
        if config.log_every and step % config.log_every == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if config.save_every_n_steps and step % config.save_every_n_steps == 0 and step < config.steps:
            _write_log(out, log)
            ckpt.save_train_state(out / "checkpoints" / f"step-{step:06d}-state", lora=para.bases(pipe.unet),
                                  optimizer=optimizer, lr_scheduler=schedule, generator=generator,
                                  progress=ckpt.Progress(0, 0, step), config={"backbone": current})  # fmt: skip
    bar.close()

    # 5. Save W' as a full pipeline
    _write_log(out, log)
    atomic_save_safetensors(
        out / "bases.safetensors", {k: v.detach().contiguous() for k, v in para.bases(pipe.unet).items()}
    )
    info = {"base": str(config.base), "steps": step, "ranks": ranks, "settings": current}
    return save_backbone(pipe, out / "backbone", info)


# a saved pipeline's files beside its weights: configs, the scheduler, a CLIP tokenizer's vocab and merges
_PIPELINE_FILES = 4 << 20
_LOG_ROW = 128  # a log.csv row: step, lr and three losses


OUTPUT = "backbone output_dir"


def _check_output_dir(config: BackboneConfig, pipe: Any) -> tuple[Path, bool]:
    """`check_output` of output_dir with the estimate from the given pipeline, or from the base built on the
    meta device; (the folder, False when the base's configs cannot tell its shapes: sized once it loads)."""
    from lorafuse.models.meta import meta_components

    comps = dict(pipe.components) if pipe is not None else None
    if comps is None:
        try:
            comps = meta_components(str(config.base))
        except UserInputError:
            pass
    estimate = 0 if comps is None else estimate_backbone_bytes(config, comps)
    return check_output(config.output_dir, kind="folder", what=OUTPUT, estimate=estimate), comps is not None


def estimate_backbone_bytes(config: BackboneConfig, comps: dict[str, Any]) -> int:
    """An upper bound of output_dir: the saved pipeline (every component's weights and buffers, W' baked in
    keeps the UNet's size, and its small files), bases.safetensors, the resumable states save_every_n_steps
    writes (all kept) and the log. The bases (two d_out x r_l matrices per tuned layer) come from the ranks
    `para.layer_ranks` gives the UNet's shapes."""
    from torch import nn

    from lorafuse.train.disk_estimate import lora_file_bytes, state_folder_bytes

    weights = sum(t.numel() * t.dtype.itemsize for m in comps.values() if isinstance(m, nn.Module)
                  for t in (*m.parameters(), *m.buffers()))  # fmt: skip
    unet = comps["unet"]
    ranks = para.layer_ranks(unet, config.para_options())
    params = {f"{path}.{kind}": torch.empty(unet.get_submodule(path).weight.shape[0], r, device="meta")
              for path, r in ranks.items() if r for kind in ("content", "style")}  # fmt: skip
    log = config.steps * _LOG_ROW
    saves = (config.steps - 1) // config.save_every_n_steps if config.save_every_n_steps else 0
    state = state_folder_bytes(params, "AdamW", len(json.dumps(_config_dict(config), default=str)), log)
    return weights + _PIPELINE_FILES + lora_file_bytes(params, 4, 0) + saves * state + log


def _feature_spec(spec: str, pipe: Any) -> str:
    if spec != "auto":
        return spec
    from lorafuse.lora.inject import pipeline_arch

    if pipeline_arch(pipe) == "world":
        return "world-oracle"
    raise UserInputError(
        "features = 'auto' knows a perceptual network only for the built-in world; for this base give "
        "features = 'vgg19:PATH.safetensors' (torchvision VGG-19 weights), or 'none' (or lambda_p = 0)"
    )


def _write_log(out: Path, lines: list[str]) -> None:
    atomic_write_text(
        out / "log.csv", "step,lr,loss_content,loss_style,perceptual\n" + "".join(f"{x}\n" for x in lines)
    )


def save_backbone(pipe: Any, folder: Path, info: dict[str, Any]) -> Path:
    """Bake W' into the UNet and save the whole pipeline with `info` as craft_backbone.json."""
    para.bake(pipe.unet)
    pipe.unet.requires_grad_(False)
    with atomic_folder(folder) as tmp:  # a killed save keeps the previous backbone, never half of one
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1, default=str))
    return Path(folder)


def load_backbone_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> BackboneConfig:
    """Read a TOML config; relative paths are taken from the config file's folder."""
    from lorafuse.config.toml_io import load_config

    cfg = load_config(BackboneConfig, path, overrides=overrides)
    if path is not None:
        root = Path(path).resolve().parent
        fix = {
            f: root / getattr(cfg, f)
            for f in ("pairs", "output_dir")
            if not Path(getattr(cfg, f)).is_absolute()
        }
        cfg = dataclasses.replace(cfg, **fix)
    return cfg
