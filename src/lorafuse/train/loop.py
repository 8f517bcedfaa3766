"""`train_lora(cfg)`: kohya-style LoRA training for SD1.5, SDXL, FLUX.1 and the built-in world model, read top to
bottom.

    run = prepare(cfg)                       checks, base, LoRA, caches, data, optimizer, resume, outputs
    for each epoch, for each micro-batch:
        training_step(run, i, batch)         draw (x_t, t, target), predict, loss, backward; the optimizer step
        on_step_end(run, epoch, i)           log, progress bar, periodic LoRA/state saves
    on_epoch_end(run, epoch)                 epoch saves and sample grids
    finish(run)                              final LoRA, state; the loss plot is drawn by `train_lora`
Notation (`train/objectives.py`): x_0 latents, ε noise, t timestep. The base's family names the objective:
DDPM (Ho et al. 2020), x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε with target ε, or v = √ᾱ_t ε − √(1−ᾱ_t) x_0 when the scheduler
(or v_parameterization) says v-prediction; rectified flow (FLUX.1), x_t = (1−σ) x_0 + σ ε with target ε − x_0.
Everything else that differs between bases (text encoding, conditioning, the denoiser call with FLUX's 2x2 patch
packing and embedded guidance) is asked of the family (`families/base.py`): nothing here branches on the base.

Accelerate places models, runs mixed precision and gradient sync, so `accelerate launch -m lorafuse train ...`
runs on several GPUs unchanged. Two things are done by hand on purpose: batches are sharded here (accelerate's
prepared dataloader calls `set_epoch` itself, which would reset the resume position), and gradient accumulation
counts micro-batches here (the last group of an epoch is short, as kohya's is, and is averaged over its size).
Resume is bit-identical on CPU for one process; with several processes only process 0's RNG is saved.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from lorafuse.config.toml_io import config_to_dict
from lorafuse.train.cache import encode_latents
from lorafuse.train.checkpoint import Progress, rng_state, save_train_state
from lorafuse.train.config import TrainConfig
from lorafuse.train.losses import diffusion_loss
from lorafuse.train.max_norm import apply_max_norm
from lorafuse.train.objectives import Noised
from lorafuse.train.offload import saved_on_host
from lorafuse.train.prepare import Run, TrainResult, caption_embeddings, prepare
from lorafuse.train.run_log import RunLog
from lorafuse.train.run_setup import Shard, accelerate_state_scope
from lorafuse.train.sampling_during_training import sample_grid
from lorafuse.train.saving import save_dtype
from lorafuse.train.validation import Validator
from lorafuse.utils.memory import release_memory

__all__ = ["TrainResult", "train_lora"]


def train_lora(cfg: TrainConfig, *, progress_bar: bool = True) -> TrainResult:
    """Train a LoRA as `cfg` says; return where everything went. User errors raise `UserInputError` early."""
    result, run_log = _train(cfg, progress_bar)
    # The base model and optimizer went with _train's frame: handing their pages back to the OS before drawing
    # the loss plot (matplotlib, ~30 MB) keeps the plot off the run's peak memory.
    release_memory()
    if run_log is not None:
        tc = cfg.training
        png = tc.output_dir / "logs" / f"{tc.output_name}_loss.png"
        result.loss_plot = run_log.plot(png, title=f"{tc.output_name} ({result.arch})")
    return result


def _train(cfg: TrainConfig, progress_bar: bool) -> tuple[TrainResult, RunLog | None]:
    with accelerate_state_scope():
        run = prepare(cfg, progress_bar)
        return _run_epochs(run)


def _run_epochs(run: Run) -> tuple[TrainResult, RunLog | None]:
    for epoch in range(run.start.epoch, run.num_epochs):
        if run.global_step >= run.total_steps or run.stop.requested:
            break
        for i, batch in _epoch_batches(run, epoch):
            if not training_step(run, i, batch):
                continue  # inside an accumulation group
            on_step_end(run, epoch, i)
            if run.global_step >= run.total_steps and i + 1 < run.batches_per_epoch:
                break  # mid-epoch; at the epoch's last batch the loop ends by itself and the epoch-end work runs
            if run.stop.requested:
                break
        else:
            on_epoch_end(run, epoch)
    return finish(run), run.run_log


def _forget(paths: list[Path], removed: list[Path]) -> None:
    for path in removed:
        paths.remove(path)


def _epoch_batches(run: Run, epoch: int):
    """(index in the epoch, batch) of this process, from the resume position on the first epoch."""
    first = run.start.batch_in_epoch if epoch == run.start.epoch else 0
    run.sampler.set_epoch(epoch, skip_batches=first)
    for m in run.trained:
        m.train()
    run.group_loss = 0.0
    return enumerate(run.loader, start=first)


def training_step(run: Run, i: int, batch: dict) -> bool:
    """Forward and backward of micro-batch i; at the end of its accumulation group [g0, g1) the optimizer step.
    Returns whether the optimizer stepped. The epoch's last group may be short; its loss is averaged over it."""
    acc = run.accelerator
    g0 = (i // run.accum) * run.accum
    g1 = min(g0 + run.accum, run.batches_per_epoch)
    sync = i + 1 == g1
    shard = run.sampler.shard(i)
    with acc.no_sync(run.model) if not sync and run.train_unet else contextlib.nullcontext():
        with acc.autocast():
            pred, noised = _predict(run, batch, shard)
        weight = batch["loss_weight"].to(acc.device) * shard.loss_scale
        loss = _loss(run, pred, noised, weight, batch.get("mask"))
        acc.backward(loss / (g1 - g0))
    run.group_loss += _global_loss(run, loss.detach()) / (g1 - g0)
    if not sync:
        return False
    _optimizer_step(run)
    return True


def _global_loss(run: Run, loss: torch.Tensor) -> float:
    """The global batch's loss (what one process with the whole batch logs): the processes' losses carry
    world · n_r / N (a pad's is 0), so their mean is Σ_r (n_r / N) loss_r."""
    if run.accelerator.num_processes == 1:
        return loss.item()
    return run.accelerator.reduce(loss, "mean").item()


def _draw(run: Run, latents: torch.Tensor, shard: Shard) -> Noised:
    """(x_t, t, target) for this process's rows. Drawn for the whole global batch from the generator every
    process seeds alike, then sliced: each sample gets the noise and timestep it gets in a one-process run."""
    if shard.total == latents.shape[0]:
        return run.objective.draw(latents, run.generator)
    start, end = (
        (shard.start, shard.end) if shard.end > shard.start else (0, 1)
    )  # a pad: the batch's first row
    x0 = latents.new_zeros((shard.total, *latents.shape[1:]))
    x0[start:end] = latents
    return run.objective.draw(x0, run.generator).rows(start, end)


def _predict(run: Run, batch: dict, shard: Shard) -> tuple[torch.Tensor, Noised]:
    """The denoiser's prediction for one micro-batch, and the draw (x_t, t, target) it was made on."""
    latents, cond = _inputs(run, batch)
    noised = _draw(run, latents, shard)
    return _denoise(run, batch, cond, noised), noised


def _inputs(run: Run, batch: dict) -> tuple[torch.Tensor, dict]:
    """Normalised latents x_0 (B, C, h, w) and the text conditioning tensors of a batch."""
    device = run.accelerator.device
    if "latents" in batch:
        latents = batch["latents"].to(device)
    else:
        latents = encode_latents(run.vae, batch["pixel_values"])
    if "text" in batch:
        text = {k: v.to(device) for k, v in batch["text"].items()}
    else:
        with torch.set_grad_enabled(run.train_te):
            text = caption_embeddings(run, batch["caption"])
    return run.family.normalize_latents(latents, run.vae_config), text


def _denoise(run: Run, batch: dict, text: dict, noised: Noised) -> torch.Tensor:
    """The family's denoiser on x_t: its prediction in the latents' layout, as the loss compares it."""
    dtype = run.weight_dtype
    cond = run.family.training_cond({k: v.to(dtype) for k, v in text.items()}, batch)
    model = run.family.training_denoiser(
        run.model, latent_hw=tuple(noised.noisy.shape[-2:]), guidance_scale=run.cfg.model.guidance_scale
    )
    offload = run.cfg.training.cpu_offload_checkpointing and run.model.training
    with saved_on_host(run.accelerator.device) if offload else contextlib.nullcontext():
        pred = model(noised.noisy.to(dtype), noised.timesteps, cond)
    return run.objective.model_output(pred, noised)


def _loss(
    run: Run, pred: torch.Tensor, noised: Noised, sample_weight: torch.Tensor | None, mask: torch.Tensor | None
) -> torch.Tensor:
    c = run.cfg.loss
    if noised.weight is not None:  # the objective's own per-sample weighting (flow: weighting_scheme)
        weight = noised.weight.to(pred.device)
        sample_weight = weight if sample_weight is None else sample_weight * weight
    return diffusion_loss(
        pred,
        noised.target,
        noised.timesteps,
        run.alphas_cumprod,
        loss_type=c.loss_type,
        huber_c=c.resolved_huber_c,
        huber_schedule=c.resolved_huber_schedule,
        min_snr_gamma=c.min_snr_gamma,
        v_prediction=run.v_pred,
        sample_weight=sample_weight,
        mask=mask,
        debiased=c.debiased_estimation_loss,
    )


def validation_loss(run: Run, validator: Validator) -> float:
    """The held-out loss at fixed noise and timesteps (train/validation.py), LoRA dropout off."""

    def loss_of(batch: dict, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        device = run.accelerator.device
        latents, cond = _inputs(run, batch)
        noised = run.objective.noised(latents, noise.to(device), timesteps.to(device))
        with run.accelerator.autocast():
            pred = _denoise(run, batch, cond, noised)
        return _loss(run, pred, noised, None, batch.get("mask"))

    for m in run.trained:
        m.eval()
    try:
        return validator.evaluate(loss_of)
    finally:
        for m in run.trained:
            m.train()


def _optimizer_step(run: Run) -> None:
    acc = run.accelerator
    if acc.num_processes > 1:
        for p in run.te_params:
            p.grad = acc.reduce(p.grad, reduction="mean")
    if run.cfg.optimizer.max_grad_norm > 0:
        acc.clip_grad_norm_(run.params, run.cfg.optimizer.max_grad_norm)
    run.optimizer.step()
    if run.cfg.optimizer.scale_weight_norms:
        apply_max_norm(run.network, run.cfg.optimizer.scale_weight_norms)
    if not acc.optimizer_step_was_skipped:  # fp16 overflow: the schedule waits as well
        run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.global_step += 1


def on_step_end(run: Run, epoch: int, i: int) -> None:
    """After optimizer step `run.global_step` (micro-batch i of `epoch`): log it, and save every n steps."""
    tc, step, loss = run.cfg.training, run.global_step, run.group_loss
    run.position = Progress(epoch, i + 1, step)
    lrs = _current_lrs(run)
    val_loss = None
    every = tc.validate_every_n_steps
    if run.validator is not None and (
        (every and step % every == 0) or step == run.total_steps
    ):  # unset: at end
        val_loss = validation_loss(run, run.validator)
        run.result.val_losses.append((step, val_loss))
    if run.run_log is not None:
        row = {
            "step": step,
            "epoch": epoch + 1,
            "loss": loss,
            "loss_avg": run.run_log.epoch_average(epoch + 1, loss),
            "lr_unet": lrs.get("unet"),
            "lr_text_encoder": lrs.get("text_encoder"),
            "seconds": round(time.time() - run.started, 3),
            "val_loss": val_loss,
        }
        run.run_log.log(row)
        if tc.logging == "tensorboard":
            run.accelerator.log({k: v for k, v in row.items() if v is not None}, step=step)
    if run.bar is not None:
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{next(iter(lrs.values())):.2e}")
    run.result.losses.append(loss)
    run.group_loss = 0.0
    if run.main and tc.sample_every_n_steps and step % tc.sample_every_n_steps == 0:
        _samples(run, f"s{step:08d}", f"step {step}")
    if tc.save_every_n_steps and step % tc.save_every_n_steps == 0 and step < run.total_steps:
        run.accelerator.wait_for_everyone()
        stem = tc.output_dir / f"{tc.output_name}-step{step:08d}"
        if run.main:
            _save_lora(run, Path(f"{stem}.safetensors"), epoch + 1)
            _forget(run.result.saved, run.lora_saves.add_step(step, run.result.saved[-1]))
        if tc.save_state:
            _save_state(run, Path(f"{stem}-state"))
            if run.main:
                _forget(run.result.states, run.state_saves.add_step(step, run.result.states[-1]))


def on_epoch_end(run: Run, epoch: int) -> None:
    """The epoch ran to its end: save every n epochs (not the last, `finish` does) and draw sample grids."""
    tc, name = run.cfg.training, run.cfg.training.output_name
    done = epoch + 1
    run.position = Progress(done, 0, run.global_step)
    last = done == run.num_epochs or run.global_step >= run.total_steps
    run.accelerator.wait_for_everyone()
    if tc.save_every_n_epochs and done % tc.save_every_n_epochs == 0 and not last:
        if run.main:
            _save_lora(run, tc.output_dir / f"{name}-{done:06d}.safetensors", done)
            _forget(run.result.saved, run.lora_saves.add_epoch(done, run.result.saved[-1]))
        if tc.save_state:
            _save_state(run, tc.output_dir / f"{name}-{done:06d}-state")
            if run.main:
                _forget(run.result.states, run.state_saves.add_epoch(done, run.result.states[-1]))
    if run.main and tc.sample_every_n_epochs and done % tc.sample_every_n_epochs == 0:
        _samples(run, f"e{done:06d}", f"epoch {done}, step {run.global_step}")


def _samples(run: Run, tag: str, when: str) -> None:
    """One sample grid of the prompts now: samples/NAME-TAG.png."""
    tc = run.cfg.training
    grid = sample_grid(
        run.pipe,
        tc.sample_prompts,
        tc.output_dir / "samples" / f"{tc.output_name}-{tag}.png",
        steps=tc.sample_steps,
        seed=tc.seed,
        resolution=run.cfg.dataset.resolution,
        clip_skip=run.cfg.model.diffusers_clip_skip if run.family.uses_clip_skip else None,
        title=f"{tc.output_name} {when}",
        autocast=run.accelerator.autocast(),
        max_token_length=run.cfg.dataset.max_token_length,
    )
    run.result.samples.append(grid)


def finish(run: Run) -> TrainResult:
    """The final LoRA and state (main process), trackers closed; the result's totals."""
    tc, result, position = run.cfg.training, run.result, run.position
    if run.bar is not None:
        run.bar.close()
    run.stop.restore()
    if run.stop.requested:  # a LoRA and a resumable state at this step; not the final file names
        result.stopped = True
        stem = tc.output_dir / f"{tc.output_name}-step{run.global_step:08d}"
        _save_lora(run, Path(f"{stem}.safetensors"), position.epoch + 1)
        _save_state(run, Path(f"{stem}-state"))
        result.lora_path = result.saved[-1]
        if run.run_log is not None:
            result.losses = run.run_log.losses
        result.global_step, result.seconds = run.global_step, time.time() - run.started
        return result
    run.accelerator.wait_for_everyone()
    if run.main:
        _save_lora(run, result.lora_path, position.epoch + (position.batch_in_epoch > 0), final=True)
    if tc.save_state:
        _save_state(run, tc.output_dir / f"{tc.output_name}-state")
    if run.main:
        if run.run_log is not None:
            result.losses = run.run_log.losses
    if tc.logging == "tensorboard":
        run.accelerator.end_training()
    result.global_step = run.global_step
    result.seconds = time.time() - run.started
    return result


def _current_lrs(run: Run) -> dict[str, float]:
    return {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(run.optimizer.param_groups)}


def _save_lora(run: Run, path: Path, epoch: int, final: bool = False) -> None:
    extra = {
        "ss_epoch": epoch,
        "ss_steps": run.global_step,
        "lorafuse_lr_at_save": json.dumps(_current_lrs(run)),
    }
    extra["lorafuse_layers"] = json.dumps(run.cfg.network.layers)
    if final:
        extra["ss_training_finished_at"] = str(int(time.time()))
    dtype = save_dtype(run.cfg.training.save_precision)
    run.network.save(path, arch=run.arch, base=run.pipe, training=run.metadata, metadata=extra, dtype=dtype,
                     format=run.cfg.training.lora_format)  # fmt: skip
    run.result.saved.append(path)


def _save_state(run: Run, folder: Path) -> None:
    """Every process calls it: each one's random streams are gathered, and the main process writes the folder."""
    process_rngs = None
    if run.accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        process_rngs = gather_object([rng_state(run.generator)])  # in process order
    if not run.main:
        return
    csv = run.run_log.csv_path if run.run_log is not None else None
    state = save_train_state(
        folder,
        lora=run.network.state_dict(),
        progress=run.position,
        config=config_to_dict(run.cfg),
        log_csv=csv,
        optimizer=run.optimizer,
        lr_scheduler=run.lr_scheduler,
        generator=run.generator,
        scaler=run.accelerator.scaler,
        process_rngs=process_rngs,
    )
    run.result.states.append(state)
