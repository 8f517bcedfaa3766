"""`lorafuse world pretrain`: train the built-in base model on the world, in resumable stages.

1. VAE on rendered images (reconstruction + a small KL term), then its latent scale is measured.
   1b. The decoder alone is fine-tuned longer on every style (encoder frozen, latents unchanged).
2. Latents of the whole training pool are cached once (the UNet never sees pixels again).
3. UNet + text encoder on cached latents with captions, min-SNR-5 weighting, 10 % empty captions (for CFG),
   EMA weights. Checkpoints every `ckpt_every` steps (safetensors + a weights-only torch state), so a killed
   run continues where it stopped. Every `eval_every` steps, samples are judged by the oracle (a CSV curve).
   3b. Caption fine-tune: the same loop continued from stage 3's EMA weights at a lower LR, with the colour word
   dropped from half the captions. Stage 3's captions always named a colour ("a teal tree"), so a prompt
   without one ("a tree") was out of distribution and drew the nearest thing the model knew (trees as rockets).
4. Export: a standard diffusers pipeline folder (EMA UNet) that plain `StableDiffusionPipeline` loads.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from lorafuse.models.world import fresh_components, scheduler_config, world_tokenizer
from lorafuse.train.losses import min_snr_weight
from lorafuse.train.objectives import DDPMObjective
from lorafuse.train.run_setup import accelerate_state_scope
from lorafuse.utils.atomic import atomic_folder, atomic_save_safetensors
from lorafuse.utils.images import to_uint8
from lorafuse.world.catalog import SEEN_STYLES, all_individuals, caption
from lorafuse.world.oracle import to_tensor
from lorafuse.world.pool import Pool


@dataclass
class PretrainConfig:
    work_dir: str
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 1e-3
    unet_steps: int = 7000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    warmup: int = 300
    cond_dropout: float = 0.1
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    ckpt_every: int = 250
    eval_every: int = 1000
    seed: int = 0
    # stage 3b (caption fine-tune); 0 steps skips it
    caption_ft_steps: int = 1500
    caption_ft_lr: float = 2e-4
    caption_ft_warmup: int = 100
    caption_ft_colour_dropout: float = 0.5


@dataclass(frozen=True)
class UNetStage:
    """One run of the UNet + text-encoder loop: its own schedule, checkpoint folder, log and export folder."""

    name: str
    steps: int
    lr: float
    warmup: int
    colour_dropout: float  # probability that a caption leaves out the object's colour word
    init: str | None = None  # pipeline folder whose UNet + text encoder the stage starts from

    @property
    def ckpt_dir(self) -> str:
        return "unet_ckpt" if self.name == "unet" else f"{self.name}_ckpt"

    @property
    def export_dir(self) -> str:
        return "eval_pipeline" if self.name == "unet" else f"eval_pipeline_{self.name}"

    @property
    def log_name(self) -> str:
        return "train_log.csv" if self.name == "unet" else f"{self.name}_log.csv"


def unet_stages(cfg: PretrainConfig) -> list[UNetStage]:
    work = Path(cfg.work_dir)
    stages = [UNetStage("unet", cfg.unet_steps, cfg.unet_lr, cfg.warmup, colour_dropout=0.0)]
    if cfg.caption_ft_steps > 0:
        stages.append(UNetStage("caption_ft", cfg.caption_ft_steps, cfg.caption_ft_lr, cfg.caption_ft_warmup,
                                cfg.caption_ft_colour_dropout, init=str(work / stages[0].export_dir)))
    return stages


def _save_safetensors(module: torch.nn.Module, path: Path) -> None:
    atomic_save_safetensors(path, {k: v.detach().contiguous() for k, v in module.state_dict().items()})


# ------------------------------------------------------------------------------------------ 1. VAE
def train_vae(cfg: PretrainConfig, pool: Pool) -> AutoencoderKL:
    work = Path(cfg.work_dir)
    done = work / "vae_final.safetensors"
    tok = world_tokenizer(work / "tokenizer")
    vae = fresh_components(tok)["vae"]
    if done.exists():
        vae.load_state_dict(load_file(str(done)))
        return vae
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05)
    bar = tqdm(range(cfg.vae_steps), desc="vae", mininterval=10)
    for _ in bar:
        idx = torch.randint(0, len(pool), (cfg.vae_batch,), generator=gen).numpy()
        x = to_tensor(pool.images[idx])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        # L1 keeps edges sharp; the tiny KL only keeps the latent scale sane
        loss = F.l1_loss(rec, x) + 0.5 * F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    _save_safetensors(vae, done)
    return vae


def finetune_decoder(cfg: PretrainConfig, vae: AutoencoderKL, pool: Pool, steps: int, lr: float = 3e-4,
                     batch: int = 16) -> AutoencoderKL:
    """1b. Decoder-only fine-tune with the encoder frozen, so cached latents stay valid (as SD's ft-MSE VAE).

    Run on a pool with every style and individual, held-out ones included: the autoencoder is not the
    generative prior (the UNet and text encoder never see held-out factors), and a decoder that cannot draw a
    held-out style would make a style LoRA for it impossible to judge.
    """
    path = Path(cfg.work_dir) / "vae_decoder_ft.safetensors"
    if path.exists():
        vae.load_state_dict(load_file(str(path)))
        return vae
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    for _ in tqdm(range(steps), desc="decoder", mininterval=10):
        idx = torch.randint(0, len(pool), (batch,), generator=gen).numpy()
        x = to_tensor(pool.images[idx])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + 0.5 * F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    _save_safetensors(vae, path)
    return vae


# ------------------------------------------------------------------------------------------ 2. latents
@torch.no_grad()
def cache_latents(cfg: PretrainConfig, vae: AutoencoderKL, pool: Pool) -> tuple[torch.Tensor, float]:
    path = Path(cfg.work_dir) / "latents.safetensors"
    if path.exists():
        z = load_file(str(path))
        return z["mean"], float(z["scale"])
    vae.eval()
    means = []
    for i in tqdm(range(0, len(pool), 256), desc="latents", mininterval=10):
        means.append(vae.encode(to_tensor(pool.images[i : i + 256])).latent_dist.mean)
    mean = torch.cat(means)
    scale = 1.0 / mean.std().item()  # SD's `scaling_factor`: unit-variance latents for the UNet
    atomic_save_safetensors(path, {"mean": mean.half().contiguous(), "scale": torch.tensor(scale)})
    return mean.half(), scale


# ------------------------------------------------------------------------------------------ 3. UNet + text encoder
def _captions(pool: Pool, with_colour: bool = True) -> list[str]:
    everyone = all_individuals()
    from lorafuse.world.catalog import STYLE_NAMES

    return [caption(everyone[i], STYLE_NAMES[s], int(t), with_colour=with_colour) for i, s, t in
            zip(pool.individual, pool.style, pool.caption_template, strict=True)]


@dataclass
class _UNetRun:
    """One stage's trainable state. `state_dict`/`load_state_dict` make the step and the noise generator an
    accelerate checkpoint object, so a resumed run continues the same random stream (bit-exact resume)."""

    unet: UNet2DConditionModel
    te: CLIPTextModel
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    ema: EMAModel
    ema_te: EMAModel
    gen: torch.Generator
    step: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.gen.set_state(state["generator"])


def _unet_run(cfg: PretrainConfig, stage: UNetStage, tok: CLIPTokenizer) -> _UNetRun:
    comps = fresh_components(tok)
    unet: UNet2DConditionModel = comps["unet"]
    te: CLIPTextModel = comps["text_encoder"]
    if stage.init:  # start from the previous stage's EMA weights (what that stage shipped)
        init = Path(stage.init)
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(init / "unet").state_dict())
        te.load_state_dict(CLIPTextModel.from_pretrained(init / "text_encoder").state_dict())
    opt = torch.optim.AdamW(list(unet.parameters()) + list(te.parameters()), lr=stage.lr, weight_decay=1e-2)

    # Warm-up times a cosine to 10 % over the whole run. Not transformers' cosine-with-min-lr schedule, which starts
    # the cosine after the warm-up: the shipped base was trained on this curve.
    def lr_at(s: int) -> float:
        return min(1.0, (s + 1) / stage.warmup) * (0.5 * (1 + math.cos(math.pi * min(s / max(stage.steps, 1), 1.0))) * 0.9 + 0.1)

    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=0.75)
    ema_te = EMAModel(te.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=0.75)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + (0 if stage.name == "unet" else 10**6))  # one per stage
    return _UNetRun(unet, te, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at), ema, ema_te, gen)


def _checkpointer(run: _UNetRun, ckpt: Path, stage: UNetStage):
    """accelerate's save_state/load_state over the stage's objects; returns save(). Resumes from `ckpt` if present."""
    from accelerate import Accelerator

    from lorafuse.errors import UserInputError

    accelerator = Accelerator()
    accelerator.register_for_checkpointing(run.unet, run.te, run.opt, run.sched, run.ema, run.ema_te, run)
    if (ckpt / "state.pt").exists():
        raise UserInputError(f"{ckpt}: a checkpoint of an older lorafuse (state.pt); delete the folder to restart "
                             "this stage")
    if ckpt.is_dir():
        accelerator.load_state(str(ckpt))
        print(f"{stage.name}: resumed at step {run.step}")

    def save() -> None:
        with atomic_folder(ckpt) as tmp:  # a run killed while saving keeps the previous checkpoint
            accelerator.save_state(str(tmp))

    return save


def train_unet(cfg: PretrainConfig, pool: Pool, latents: torch.Tensor, scale: float, oracle=None, vae=None,
               stage: UNetStage | None = None) -> dict:
    """Train (or resume) one UNet stage; the accelerate state it makes for checkpointing ends with it."""
    with accelerate_state_scope():
        return _train_unet_stage(cfg, pool, latents, scale, oracle, vae, stage)


def _train_unet_stage(cfg: PretrainConfig, pool: Pool, latents: torch.Tensor, scale: float, oracle, vae,
                      stage: UNetStage | None) -> dict:
    stage = stage or unet_stages(cfg)[0]
    work = Path(cfg.work_dir)
    tok = CLIPTokenizer.from_pretrained(work / "tokenizer")
    run = _unet_run(cfg, stage, tok)
    save = _checkpointer(run, work / stage.ckpt_dir, stage)
    objective = DDPMObjective(scheduler_config(), "epsilon")  # the base's betas, ε-prediction

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    ids = tokenize(_captions(pool))
    ids_no_colour = tokenize(_captions(pool, with_colour=False)) if stage.colour_dropout > 0 else ids
    empty = tokenize([""])[0]
    unet, te, gen = run.unet, run.te, run.gen
    params = list(unet.parameters()) + list(te.parameters())
    bar = tqdm(range(run.step, stage.steps), initial=run.step, total=stage.steps, desc=stage.name, mininterval=10)
    t0 = time.time()
    for step in bar:
        idx = torch.randint(0, len(pool), (cfg.unet_batch,), generator=gen)
        z0 = latents[idx].float() * scale
        no_colour = torch.rand(len(idx), generator=gen) < stage.colour_dropout
        text_ids = torch.where(no_colour[:, None], ids_no_colour[idx], ids[idx])
        drop = torch.rand(len(idx), generator=gen) < cfg.cond_dropout
        text_ids[drop] = empty
        noised = objective.draw(z0, gen)
        pred = unet(noised.noisy, noised.timesteps, te(text_ids).last_hidden_state).sample
        w = min_snr_weight(noised.timesteps, objective.alphas_cumprod, cfg.min_snr_gamma)
        loss = (F.mse_loss(pred, noised.target, reduction="none").mean((1, 2, 3)) * w).mean()
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        run.opt.step()
        run.sched.step()
        run.ema.step(unet.parameters())
        run.ema_te.step(te.parameters())
        run.step = done = step + 1
        if done % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{run.sched.get_last_lr()[0]:.2e}")
        if done % cfg.ckpt_every == 0 or done == stage.steps:
            save()
        if oracle is not None and (done % cfg.eval_every == 0 or done == stage.steps):
            row = {"step": done, "minutes": round((time.time() - t0) / 60, 1), "loss": round(loss.item(), 4)}
            pipe = export(cfg, unet, te, run.ema, run.ema_te, vae, tok, scale, work / stage.export_dir)
            _log_eval(work / stage.log_name, {**row, **evaluate(pipe, oracle, n=96, steps=25, seed=done)})
    # no oracle, or resumed after the end: the next stage and `finalize` start from this folder
    if vae is not None and not (work / stage.export_dir / "model_index.json").exists():
        export(cfg, unet, te, run.ema, run.ema_te, vae, tok, scale, work / stage.export_dir)
    return {"steps": stage.steps}


def _log_eval(log_path: Path, row: dict) -> None:
    new = not log_path.exists()
    with open(log_path, "a", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(row))
        if new:
            wr.writeheader()
        wr.writerow(row)
    print(json.dumps(row), flush=True)


def export(cfg: PretrainConfig, unet, te, ema: EMAModel, ema_te: EMAModel, vae: AutoencoderKL,
           tok: CLIPTokenizer, scale: float, out: Path) -> StableDiffusionPipeline:
    """Write a diffusers pipeline folder with the EMA weights (training weights are left untouched)."""
    import copy

    unet_e, te_e = copy.deepcopy(unet), copy.deepcopy(te)
    ema.copy_to(unet_e.parameters())
    ema_te.copy_to(te_e.parameters())
    vae.register_to_config(scaling_factor=scale)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te_e, tokenizer=tok, unet=unet_e,
                                   scheduler=DDIMScheduler(**scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    with atomic_folder(out) as tmp:  # a killed export keeps the previous base folder, never half of one
        pipe.save_pretrained(tmp)
        # transformers 5 saves only tokenizer.json; keep the real CLIP files (vocab.json + merges.txt) beside it
        # so every CLIP loader (older transformers, open_clip-style code, A1111/ComfyUI) can read the tokenizer
        shutil.copytree(Path(cfg.work_dir) / "tokenizer", tmp / "tokenizer", dirs_exist_ok=True)
        (tmp / "lorafuse_pretrain.json").write_text(json.dumps(asdict(cfg), indent=1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def finalize(cfg: PretrainConfig, out: str | Path) -> Path:
    """Ship the last stage's evaluated EMA pipeline, with the fine-tuned decoder when stage 1b ran, to `out`."""
    work, out = Path(cfg.work_dir), Path(out)
    last = unet_stages(cfg)[-1]
    pipe = StableDiffusionPipeline.from_pretrained(work / last.export_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    ft = work / "vae_decoder_ft.safetensors"
    if ft.exists():
        pipe.vae.load_state_dict(load_file(str(ft)))
    with atomic_folder(out) as tmp:  # the folder appears whole or not at all
        pipe.save_pretrained(tmp)
        shutil.copytree(work / "tokenizer", tmp / "tokenizer", dirs_exist_ok=True)
        (tmp / "lorafuse_pretrain.json").write_text(json.dumps(asdict(cfg), indent=1))
        for stage in unet_stages(cfg):  # the oracle-accuracy curve of every stage
            if (work / stage.log_name).exists():
                shutil.copy(work / stage.log_name, tmp / ("pretrain_log.csv" if stage.name == "unet"
                                                          else f"pretrain_{stage.name}_log.csv"))
    return out


@torch.no_grad()
def evaluate(pipe: StableDiffusionPipeline, oracle, n: int = 96, steps: int = 25, seed: int = 0,
             guidance: float = 4.0) -> dict:
    """Oracle accuracy of samples for seen class x style prompts (class and style named in the prompt)."""
    from lorafuse.world.catalog import CLASS_NAMES

    rng = np.random.default_rng(seed)
    classes = [CLASS_NAMES[k % len(CLASS_NAMES)] for k in range(n)]
    styles = [SEEN_STYLES[int(rng.integers(len(SEEN_STYLES)))] for _ in range(n)]
    from lorafuse.world.catalog import style_phrase

    prompts = [f"a photo of a {c}, in {style_phrase(s)} style" for c, s in zip(classes, styles, strict=True)]
    images = []
    for i in range(0, n, 32):
        out = pipe(prompts[i : i + 32], num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                   generator=torch.Generator().manual_seed(seed + i), output_type="np")
        images.append(to_uint8(out.images))
    images = np.concatenate(images)
    verdict = oracle.judge(images)
    cls_acc = float(np.mean([a == b for a, b in zip(verdict.cls, classes, strict=True)]))
    sty_acc = float(np.mean([a == b for a, b in zip(verdict.style_name, styles, strict=True)]))
    return {"class_acc": round(cls_acc, 3), "style_acc": round(sty_acc, 3), "n": n}
