"""`train_lora(cfg)`: kohya-style LoRA training for SD1.5, SDXL and the built-in world model, read top to bottom.

    1. check inputs (dataset, optimizer, resume state) before any compute or any write
    2. load the base model          6. optimizer and LR schedule
    3. inject the LoRA              7. resume
    4. caches                       8. output folder (the run's first write)
    5. data                         9. the loop: noise, predict, loss, step, log, save, sample
                                   10. final LoRA, state and loss plot
Notation (algorithms.md §8): x_0 latents, ε noise, t timestep, ᾱ_t = alphas_cumprod[t], x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε;
the target is ε, or v = √ᾱ_t ε − √(1−ᾱ_t) x_0 when the scheduler (or v_parameterization) says v-prediction.

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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafuse.config.toml_io import config_to_dict, save_config
from lorafuse.lora.presets import detect_arch
from lorafuse.models.load import load_base_pipeline
from lorafuse.train.cache import LatentCache, TextEncoderCache, encode_latents, text_embeddings
from lorafuse.train.checkpoint import (
    Progress,
    check_resume_config,
    read_train_state,
    restore_train_state,
    save_train_state,
)
from lorafuse.train.config import TrainConfig
from lorafuse.train.data import TrainDataset, collate_batch, describe, scan_dataset
from lorafuse.train.losses import diffusion_loss
from lorafuse.train.network import create_network
from lorafuse.train.optim import make_lr_scheduler, make_optimizer
from lorafuse.train.run_log import RunLog
from lorafuse.train.run_setup import (
    ShardedBatchSampler,
    check_optimizer,
    make_accelerator,
    sdxl_added_cond,
    training_metadata,
)
from lorafuse.train.sampling_during_training import sample_grid
from lorafuse.train.saving import SaveRotation, check_implemented, save_dtype
from lorafuse.train.stop import StopRequest
from lorafuse.train.timesteps import noise_like, sample_timesteps
from lorafuse.train.validation import Validator, split_validation
from lorafuse.utils.atomic import check_output
from lorafuse.utils.memory import release_memory


@dataclass
class TrainResult:
    lora_path: Path  # the final LoRA file
    saved: list[Path] = field(default_factory=list)  # every LoRA file this run wrote, in order
    states: list[Path] = field(default_factory=list)  # every resumable state folder this run wrote
    samples: list[Path] = field(default_factory=list)  # sample grids
    config_path: Path | None = None  # the effective config, beside the outputs
    log_csv: Path | None = None
    loss_plot: Path | None = None
    arch: str = ""
    global_step: int = 0  # optimizer steps done at the end (including those before a resume)
    total_steps: int = 0
    batches_per_epoch: int = 0  # micro-batches per epoch on this process
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    losses: list[float] = field(
        default_factory=list
    )  # per optimizer step (with a log: from step 1 on resume)
    seconds: float = 0.0
    stopped: bool = False  # ended early by SIGINT (train.stop); the last entry of `states` resumes it


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
    """Steps 1-10 of the docstring at the top; the loss plot is left to the caller."""
    started = time.time()
    tc, ds, loss_cfg = cfg.training, cfg.dataset, cfg.loss

    # 1. Check inputs before any compute or any write
    check_implemented(cfg)
    check_output(tc.output_dir, kind="folder", what="training.output_dir")
    index = scan_dataset(ds)
    val_seed = ds.validation_seed if ds.validation_seed is not None else tc.seed
    index, val_index = split_validation(index, ds.validation_split, val_seed)
    check_optimizer(cfg.optimizer.optimizer_type)
    saved = read_train_state(tc.resume) if tc.resume is not None else None
    if saved is not None:
        check_resume_config(saved.config, config_to_dict(cfg), saved.folder)
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    from accelerate.utils import set_seed

    set_seed(tc.seed)  # python, numpy and torch; the LoRA's initial A draws from torch's

    # 2. Load the base model
    pipe = load_base_pipeline(cfg.model.pretrained_model_name_or_path)
    arch = detect_arch(pipe)
    unet, vae = pipe.unet, pipe.vae
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    text_encoders = [t for t in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if t is not None]
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training-time forward process
    v_pred = cfg.model.v_parameterization or noise_scheduler.config.prediction_type == "v_prediction"
    if v_pred:
        for scheduler in (noise_scheduler, pipe.scheduler):
            scheduler.register_to_config(prediction_type="v_prediction")
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    # The VAE keeps its dtype (fp16 SD VAEs overflow; it runs once per image when caching). Frozen base weights
    # need only the compute dtype; diffusers warns about any .to(dtype=...), so cast only when it changes.
    vae.to(accelerator.device)
    for module in (unet, *text_encoders):
        module.to(accelerator.device, **({"dtype": weight_dtype} if weight_dtype != torch.float32 else {}))
    vae.requires_grad_(False)
    clip_skip = cfg.model.clip_skip if arch != "sdxl" else 1  # SDXL fixes the layer, as kohya's sdxl trainer

    # 3. Inject the LoRA (trainable factors in float32)
    network = create_network(pipe, cfg.network, arch)
    train_unet, train_te = "unet" in network.plan, any(c.startswith("text_encoder") for c in network.plan)
    if tc.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te in text_encoders if train_te else ():
            # non-reentrant: the reentrant variant passes no gradient to LoRA layers whose inputs need none
            kwargs = {"use_reentrant": False}
            if hasattr(te, "activation_checkpointing_enable"):  # transformers 5 renamed it
                te.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # 4. Caches (latents: posterior mean, cached or not, so caching changes speed, never results)
    validator = None
    if val_index is not None:  # held-out latents (and frozen text outputs) now, before the encoders may go
        validator = Validator(
            val_index, tc.train_batch_size, val_seed, loss_cfg.min_timestep, loss_cfg.max_timestep
        )
        frozen_text = (
            None
            if train_te
            else (lambda c: text_embeddings(tokenizers, text_encoders, c, clip_skip, ds.max_token_length))
        )
        validator.prepare(lambda px: encode_latents(vae, px), frozen_text)
    latent_cache = text_cache = None
    if ds.cache_latents:
        latent_cache = LatentCache(vae, to_disk=ds.cache_latents_to_disk, cache_dir=ds.cache_dir)
        latent_cache.prepare(index)
    if ds.cache_text_encoder_outputs:
        text_cache = TextEncoderCache(
            tokenizers,
            text_encoders,
            clip_skip,
            to_disk=ds.cache_text_encoder_outputs_to_disk,
            cache_dir=ds.cache_dir,
            max_token_length=ds.max_token_length,
        )
        text_cache.prepare(index)
    # Frozen encoders the loop will not call again go now rather than at the end, so the training steps reuse
    # their memory (for SD1.5 the VAE encoder and CLIP are ~0.6 GB in fp32; kohya likewise moves the VAE off the
    # GPU after caching). Samples during training still need the text encoders and the VAE's decoder.
    sampling = bool(tc.sample_every_n_epochs)
    scaling_factor = vae.config.scaling_factor
    if latent_cache is not None:
        latent_cache.release_vae()
        if sampling:
            vae.encoder = vae.quant_conv = None  # decode() uses neither
        else:
            pipe.vae = None
        vae = None
    if text_cache is not None and not train_te and not sampling:
        text_cache.release_encoders()
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                setattr(pipe, name, None)
        text_encoders = []
    release_memory()  # the caching passes' activations and the dropped weights, back to the OS

    # 5. Data: the order of every epoch is a function of (seed, epoch); the loader gets its own generator
    # because creating a DataLoader iterator draws a seed, which would shift the global stream dropout uses.
    sampler = ShardedBatchSampler(
        index, tc.train_batch_size, tc.seed, accelerator.process_index, accelerator.num_processes
    )
    loader = torch.utils.data.DataLoader(
        TrainDataset(index, tc.seed, latent_cache, text_cache),
        batch_sampler=sampler,
        collate_fn=collate_batch,
        generator=torch.Generator().manual_seed(tc.seed),
    )
    batches_per_epoch = sampler.batches_per_epoch
    total_steps = tc.total_steps(batches_per_epoch)
    num_epochs = tc.num_epochs(batches_per_epoch)
    accum = tc.gradient_accumulation_steps
    if main:
        print(describe(index, tc))
        print("  " + ", ".join(f"{c}: {network.num_modules(c)} LoRA modules" for c in sorted(network.plan)))

    # 6. Optimizer and LR schedule
    o = cfg.optimizer
    optimizer = make_optimizer(
        o.optimizer_type,
        network.param_groups(o.unet_lr or o.learning_rate, o.text_encoder_lr or o.learning_rate),
        lr=o.learning_rate,
        weight_decay=o.weight_decay,
        betas=o.betas,
    )
    lr_scheduler = make_lr_scheduler(
        cfg.scheduler.lr_scheduler,
        optimizer,
        total_steps,
        lr_warmup_steps=cfg.scheduler.warmup_steps(total_steps),
        num_cycles=cfg.scheduler.lr_scheduler_num_cycles,
        power=cfg.scheduler.lr_scheduler_power,
    )
    # Only the UNet goes through accelerate's DDP wrapper; text-encoder LoRA gradients are averaged by hand below,
    # because the text encoders are called through `text_embeddings`, which needs the plain modules.
    trained = [network.components[c] for c in sorted(network.plan)]  # modules with a LoRA
    if train_unet:
        model, optimizer = accelerator.prepare(unet, optimizer)
    else:
        model, optimizer = unet, accelerator.prepare(optimizer)
    params = list(network.named_parameters().values())
    te_params = [p for n, p in network.named_parameters().items() if n.startswith("text_encoder")]

    # 7. Resume: LoRA, optimizer, schedule, every RNG, and the position in the data
    # Noise and timesteps draw from their own CPU generator: the same numbers on any device, and savable.
    generator = torch.Generator().manual_seed(tc.seed + 1_000_003 * accelerator.process_index)
    start = Progress(epoch=0, batch_in_epoch=0, global_step=0)
    if saved is not None:
        restore_train_state(
            saved,
            load_lora=network.load_state_dict,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            generator=generator,
            scaler=accelerator.scaler,
        )
        start = saved.progress
        if main:
            print(f"  resumed from {saved.folder}: epoch {start.epoch + 1}, step {start.global_step}")

    # 8. Output folder: the run's first write
    out, name = tc.output_dir, tc.output_name
    result = TrainResult(lora_path=out / f"{name}.safetensors", arch=arch, total_steps=total_steps)
    result.batches_per_epoch = batches_per_epoch
    metadata = training_metadata(cfg, index, total_steps, num_epochs, v_pred)
    metadata["training_started_at"] = str(int(started))
    run_log = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        result.config_path = out / f"{name}.toml"
        save_config(cfg, result.config_path)
        if tc.logging != "none":
            history = saved.folder / "log.csv" if saved is not None else None
            run_log = RunLog(
                out / "logs" / f"{name}.csv",
                history=history,
                up_to_step=start.global_step,
                jsonl=tc.logging == "jsonl",
            )
            result.log_csv = run_log.csv_path
        if tc.logging == "tensorboard":
            accelerator.init_trackers(name, config={"config": json.dumps(config_to_dict(cfg))})

    def current_lrs() -> dict[str, float]:
        return {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}

    def save(path: Path, epoch: int, step: int, final: bool = False) -> None:
        extra = {"ss_epoch": epoch, "ss_steps": step, "lorafuse_lr_at_save": json.dumps(current_lrs())}
        extra["lorafuse_layers"] = json.dumps(cfg.network.layers)
        if final:
            extra["ss_training_finished_at"] = str(int(time.time()))
        dtype = save_dtype(tc.save_precision)
        network.save(path, arch=arch, base=pipe, training=metadata, metadata=extra, dtype=dtype)
        result.saved.append(path)

    def save_state(folder: Path, position: Progress) -> None:
        lora = network.state_dict()
        config = config_to_dict(cfg)
        csv = run_log.csv_path if run_log is not None else None
        kwargs = dict(
            optimizer=optimizer, lr_scheduler=lr_scheduler, generator=generator, scaler=accelerator.scaler
        )
        result.states.append(
            save_train_state(folder, lora=lora, progress=position, config=config, log_csv=csv, **kwargs)
        )

    def validation_loss(validator: Validator) -> float:
        """The held-out loss at fixed noise and timesteps (train/validation.py), LoRA dropout off."""

        def loss_of(batch: dict, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
            device = accelerator.device
            latents = batch["latents"].to(device) * scaling_factor
            if "text" in batch:
                cond = {k: v.to(device) for k, v in batch["text"].items()}
            else:
                cond = text_embeddings(
                    tokenizers, text_encoders, batch["caption"], clip_skip, ds.max_token_length
                )
            timesteps, noise = timesteps.to(device), noise.to(device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_pred else noise
            added = None
            if arch == "sdxl":
                added = sdxl_added_cond(batch, cond["pooled_prompt_embeds"], device, weight_dtype)
            with accelerator.autocast():
                pred = model(
                    noisy.to(weight_dtype),
                    timesteps,
                    cond["encoder_hidden_states"].to(weight_dtype),
                    added_cond_kwargs=added,
                ).sample
            return diffusion_loss(
                pred,
                target,
                timesteps,
                alphas_cumprod,
                loss_type=loss_cfg.loss_type,
                huber_c=loss_cfg.resolved_huber_c,
                huber_schedule=loss_cfg.resolved_huber_schedule,
                min_snr_gamma=loss_cfg.min_snr_gamma,
                v_prediction=v_pred,
            )

        for m in trained:
            m.eval()
        try:
            return validator.evaluate(loss_of)
        finally:
            for m in trained:
                m.train()

    # kohya's save_last_n_*: older periodic saves are deleted as new ones arrive
    lora_saves = SaveRotation(tc.save_last_n_epochs, tc.save_last_n_steps)
    state_saves = SaveRotation(tc.save_last_n_epochs_state, tc.save_last_n_steps_state)

    # 9. The loop
    bar = None
    if progress_bar and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start.global_step, desc="steps", dynamic_ncols=True)
    global_step, position = start.global_step, start
    # one process only: a stop on one rank of several would leave the others waiting at the next collective
    stop = StopRequest().install() if accelerator.num_processes == 1 else StopRequest()
    for epoch in range(start.epoch, num_epochs):
        if global_step >= total_steps or stop.requested:
            break
        first = start.batch_in_epoch if epoch == start.epoch else 0
        sampler.set_epoch(epoch, skip_batches=first)
        for m in trained:
            m.train()
        group_loss = 0.0
        for i, batch in enumerate(loader, start=first):
            # micro-batches i of one optimizer step: [g0, g1); the epoch's last group may be short
            g0 = (i // accum) * accum
            g1 = min(g0 + accum, batches_per_epoch)
            sync = i + 1 == g1
            with accelerator.no_sync(model) if not sync and train_unet else contextlib.nullcontext():
                with accelerator.autocast():
                    # latents x_0: (B, 4, h, w)
                    if "latents" in batch:
                        latents = batch["latents"].to(accelerator.device)
                    else:
                        latents = encode_latents(vae, batch["pixel_values"])
                    latents = latents * scaling_factor
                    if "text" in batch:
                        cond = {k: v.to(accelerator.device) for k, v in batch["text"].items()}
                    else:
                        with torch.set_grad_enabled(train_te):
                            cond = text_embeddings(
                                tokenizers, text_encoders, batch["caption"], clip_skip, ds.max_token_length
                            )
                    timesteps = sample_timesteps(
                        latents.shape[0],
                        generator,
                        t_min=loss_cfg.min_timestep,
                        t_max=loss_cfg.max_timestep,
                        bias=loss_cfg.timestep_bias,
                    ).to(accelerator.device)
                    noise = noise_like(latents, generator, loss_cfg.noise_offset).to(accelerator.device)
                    noisy = noise_scheduler.add_noise(latents, noise, timesteps)  # x_t
                    target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_pred else noise
                    added = None
                    if arch == "sdxl":
                        added = sdxl_added_cond(
                            batch, cond["pooled_prompt_embeds"], accelerator.device, weight_dtype
                        )
                    pred = model(
                        noisy.to(weight_dtype),
                        timesteps,
                        cond["encoder_hidden_states"].to(weight_dtype),
                        added_cond_kwargs=added,
                    ).sample
                loss = diffusion_loss(
                    pred,
                    target,
                    timesteps,
                    alphas_cumprod,
                    loss_type=loss_cfg.loss_type,
                    huber_c=loss_cfg.resolved_huber_c,
                    huber_schedule=loss_cfg.resolved_huber_schedule,
                    min_snr_gamma=loss_cfg.min_snr_gamma,
                    v_prediction=v_pred,
                    sample_weight=batch["loss_weight"].to(accelerator.device),
                )
                accelerator.backward(loss / (g1 - g0))
            group_loss += loss.detach().item() / (g1 - g0)
            if not sync:
                continue
            if accelerator.num_processes > 1:
                for p in te_params:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
            if o.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, o.max_grad_norm)
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the schedule waits as well
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            position = Progress(epoch, i + 1, global_step)
            lrs = current_lrs()
            val_loss = None
            if validator is not None and (
                (tc.validate_every_n_steps and global_step % tc.validate_every_n_steps == 0)
                or global_step == total_steps  # unset: once, at the end
            ):
                val_loss = validation_loss(validator)
                result.val_losses.append((global_step, val_loss))
            if run_log is not None:
                row = {
                    "step": global_step,
                    "epoch": epoch + 1,
                    "loss": group_loss,
                    "loss_avg": run_log.epoch_average(epoch + 1, group_loss),
                    "lr_unet": lrs.get("unet"),
                    "lr_text_encoder": lrs.get("text_encoder"),
                    "seconds": round(time.time() - started, 3),
                    "val_loss": val_loss,
                }
                run_log.log(row)
                if tc.logging == "tensorboard":
                    accelerator.log({k: v for k, v in row.items() if v is not None}, step=global_step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{group_loss:.4f}", lr=f"{next(iter(lrs.values())):.2e}")
            result.losses.append(group_loss)
            group_loss = 0.0
            if (
                tc.save_every_n_steps
                and global_step % tc.save_every_n_steps == 0
                and global_step < total_steps
            ):
                accelerator.wait_for_everyone()
                if main:
                    save(out / f"{name}-step{global_step:08d}.safetensors", epoch + 1, global_step)
                    _forget(result.saved, lora_saves.add_step(global_step, result.saved[-1]))
                    if tc.save_state:
                        save_state(out / f"{name}-step{global_step:08d}-state", position)
                        _forget(result.states, state_saves.add_step(global_step, result.states[-1]))
            if global_step >= total_steps and i + 1 < batches_per_epoch:
                break  # mid-epoch; at the epoch's last batch the loop ends by itself and the epoch-end work runs
            if stop.requested:
                break
        else:  # the epoch ran to its end
            position = Progress(epoch + 1, 0, global_step)
            last = epoch + 1 == num_epochs or global_step >= total_steps
            accelerator.wait_for_everyone()
            if main and tc.save_every_n_epochs and (epoch + 1) % tc.save_every_n_epochs == 0 and not last:
                save(out / f"{name}-{epoch + 1:06d}.safetensors", epoch + 1, global_step)
                _forget(result.saved, lora_saves.add_epoch(epoch + 1, result.saved[-1]))
                if tc.save_state:
                    save_state(out / f"{name}-{epoch + 1:06d}-state", position)
                    _forget(result.states, state_saves.add_epoch(epoch + 1, result.states[-1]))
            if main and tc.sample_every_n_epochs and (epoch + 1) % tc.sample_every_n_epochs == 0:
                grid = sample_grid(
                    pipe,
                    tc.sample_prompts,
                    out / "samples" / f"{name}-e{epoch + 1:06d}.png",
                    steps=tc.sample_steps,
                    seed=tc.seed,
                    resolution=ds.resolution,
                    clip_skip=cfg.model.diffusers_clip_skip if arch != "sdxl" else None,
                    title=f"{name} epoch {epoch + 1}, step {global_step}",
                    autocast=accelerator.autocast(),
                    max_token_length=ds.max_token_length,
                )
                result.samples.append(grid)
    if bar is not None:
        bar.close()
    stop.restore()
    if stop.requested:  # a LoRA and a resumable state at this step; not the final file names
        result.stopped = True
        save(out / f"{name}-step{global_step:08d}.safetensors", position.epoch + 1, global_step)
        save_state(out / f"{name}-step{global_step:08d}-state", position)
        result.lora_path = result.saved[-1]
        if run_log is not None:
            result.losses = run_log.losses
        result.global_step, result.seconds = global_step, time.time() - started
        return result, run_log

    # 10. Final LoRA, state and loss plot
    accelerator.wait_for_everyone()
    if main:
        save(result.lora_path, position.epoch + (position.batch_in_epoch > 0), global_step, final=True)
        if tc.save_state:
            save_state(out / f"{name}-state", position)
        if run_log is not None:
            result.losses = run_log.losses
    if tc.logging == "tensorboard":
        accelerator.end_training()
    result.global_step = global_step
    result.seconds = time.time() - started
    return result, run_log


def _forget(paths: list[Path], removed: list[Path]) -> None:
    for path in removed:
        paths.remove(path)
