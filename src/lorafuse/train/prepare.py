"""`prepare(cfg)`: everything `train_lora` does before its first step, as one `Run` the loop then works on.

    1. check inputs (dataset, optimizer, resume state) before any compute or any write
    2. load the base model and its training objective     6. optimizer and LR schedule
    3. inject the LoRA                                     7. resume
    4. caches                                              8. output folder (the run's first write)
    5. data
The order matters for bit-exact resume: the LoRA's initial A draws from torch's global RNG after `set_seed`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafuse.config.toml_io import config_to_dict, save_config
from lorafuse.errors import UserInputError
from lorafuse.families import Family, family_of
from lorafuse.models.load import load_base_pipeline
from lorafuse.train import loraplus
from lorafuse.train.block_swap import BlockSwap, swapped_blocks, to_device_except
from lorafuse.train.cache import LatentCache, TextEncoderCache, encode_latents, text_embeddings
from lorafuse.train.checkpoint import (
    Progress,
    SavedState,
    check_resume_config,
    check_resume_processes,
    read_train_state,
    restore_train_state,
)
from lorafuse.train.config import TrainConfig
from lorafuse.train.data import DatasetIndex, TrainDataset, collate_batch, describe
from lorafuse.train.disk_estimate import check_disk_space, meta_network
from lorafuse.train.estimate import check_device_memory
from lorafuse.train.network import create_network
from lorafuse.train.objectives import Objective, objective_for
from lorafuse.train.offload import Offload, enable_checkpointing, enable_text_encoder_checkpointing
from lorafuse.train.optim import make_lr_scheduler, make_optimizer
from lorafuse.train.quantize import quantize_frozen_base
from lorafuse.train.run_log import RunLog
from lorafuse.train.run_setup import (
    ShardedBatchSampler,
    check_settings,
    denoiser_joins_after_caching,
    make_accelerator,
    training_metadata,
)
from lorafuse.train.saving import SaveRotation
from lorafuse.train.scan import scan_dataset
from lorafuse.train.stop import StopRequest
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
    # per optimizer step (with a log: from step 1 on resume)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    stopped: bool = False  # ended early by SIGINT (train.stop); the last entry of `states` resumes it


@dataclass
class Run:
    """The state of one training run: what `prepare` built and what the loop moves forward."""

    cfg: TrainConfig
    accelerator: Any
    index: DatasetIndex
    saved: SavedState | None  # the state resumed from
    started: float
    val_index: DatasetIndex | None = None  # held-out samples (dataset.validation_split)
    val_seed: int = 0
    validator: Validator | None = None
    # 2. base and objective
    pipe: Any = None
    family: Family | None = None  # what differs between bases: text encoding, denoiser call, objective
    arch: str = ""  # the family's name, for files and messages
    denoiser: Any = None  # the UNet or transformer
    vae: Any = None
    vae_config: dict = field(default_factory=dict)  # kept when the VAE is dropped after caching
    tokenizers: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)
    objective: Objective | None = None
    alphas_cumprod: torch.Tensor | None = None  # DDPM objectives, on the device, for the loss's SNR terms
    v_pred: bool = False
    weight_dtype: torch.dtype = torch.float32
    clip_skip: int = 1
    # 3. LoRA
    network: Any = None
    train_unet: bool = False
    train_te: bool = False
    # 4-5. caches and data
    latent_cache: LatentCache | None = None
    text_cache: TextEncoderCache | None = None
    sampler: ShardedBatchSampler | None = None
    loader: Any = None
    batches_per_epoch: int = 0
    total_steps: int = 0
    num_epochs: int = 0
    # 6-7. optimisation and resume
    optimizer: Any = None
    lr_scheduler: Any = None
    model: Any = None  # the denoiser as accelerate prepared it (DDP-wrapped with several processes)
    trained: list = field(default_factory=list)  # modules with a LoRA
    params: list = field(default_factory=list)
    te_params: list = field(default_factory=list)
    generator: torch.Generator | None = None  # noise and timesteps
    start: Progress = field(default_factory=lambda: Progress(0, 0, 0))
    # 8. outputs, and the loop's position
    result: TrainResult | None = None
    metadata: dict = field(default_factory=dict)
    run_log: RunLog | None = None
    bar: Any = None
    global_step: int = 0
    position: Progress = field(default_factory=lambda: Progress(0, 0, 0))
    group_loss: float = 0.0  # loss of the accumulation group so far
    lora_saves: SaveRotation | None = None  # kohya's save_last_n_*: older periodic saves are deleted
    state_saves: SaveRotation | None = None
    stop: StopRequest | None = None
    swap: BlockSwap | None = None  # blocks_to_swap's hooks

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def accum(self) -> int:
        return self.cfg.training.gradient_accumulation_steps


def _check_cache_folders(ds, index) -> None:
    """Caches kept on disk are written beside the images (or in cache_dir): a read-only dataset must show before
    the base loads, not at the first cache file."""
    if not (ds.cache_latents_to_disk or ds.cache_text_encoder_outputs_to_disk):
        return
    folders = {ds.cache_dir} if ds.cache_dir is not None else {item.path.parent for item in index.items}
    for folder in sorted(folders):
        check_output(folder, kind="folder", what="disk cache (cache_*_to_disk)")


def prepare(cfg: TrainConfig, progress_bar: bool = True) -> Run:
    """Steps 1-8 of the module docstring. User errors raise `UserInputError` before any model loads."""
    started = time.time()
    tc, ds = cfg.training, cfg.dataset
    check_settings(cfg)
    check_output(tc.output_dir, kind="folder", what="training.output_dir")
    index = scan_dataset(ds)
    _check_cache_folders(ds, index)
    val_seed = ds.validation_seed if ds.validation_seed is not None else tc.seed
    index, val_index = split_validation(index, ds.validation_split, val_seed)
    sized = meta_network(cfg)  # the LoRA's shapes from the base's configs, no weights read
    if sized is not None:
        check_disk_space(cfg, index, *sized)
    saved = read_train_state(tc.resume) if tc.resume is not None else None
    if saved is not None:
        check_resume_config(saved.config, config_to_dict(cfg), saved.folder)
    accelerator = make_accelerator(cfg)
    if saved is not None:
        check_resume_processes(saved, accelerator.num_processes)  # before any model loads
    if accelerator.device.type == "cuda" and tc.memory_check:
        check_device_memory(cfg, accelerator.device, len(index.items))  # before any model loads
    from accelerate.utils import set_seed

    set_seed(tc.seed)  # python, numpy and torch; the LoRA's initial A draws from torch's
    run = Run(cfg=cfg, accelerator=accelerator, index=index, saved=saved, started=started)
    run.val_index, run.val_seed = val_index, val_seed
    _load_base(run)
    _inject_lora(run)
    if sized is None:  # a base whose configs do not tell its shapes: sized by its real LoRA, before any step
        modules = {k: v for k, v in run.pipe.components.items() if isinstance(v, torch.nn.Module)}
        check_disk_space(cfg, index, modules, run.network)
    _build_caches(run)
    _build_data(run)
    _build_optimizer(run)
    _resume(run)
    _open_outputs(run, progress_bar)
    return run


def _load_base(run: Run) -> None:
    """2. The base model on the device, in the compute dtype, and the objective its family names."""
    cfg, accelerator = run.cfg, run.accelerator
    run.pipe = pipe = load_base_pipeline(
        cfg.model.pretrained_model_name_or_path, parts=cfg.model.part_files, tokenizers=cfg.model.tokenizers
    )
    run.family = family = family_of(pipe)
    run.arch = family.name
    run.denoiser, run.vae = family.denoiser(pipe), pipe.vae
    run.vae_config = dict(pipe.vae.config)
    run.tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    run.text_encoders = [
        t for t in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if t is not None
    ]
    family.check_text_options(cfg.dataset.max_token_length, cfg.dataset.t5xxl_max_token_length)
    _check_clip_skip(cfg, family, pipe)
    run.v_pred = cfg.model.v_parameterization or pipe.scheduler.config.get("prediction_type") == "v_prediction"
    run.objective = objective_for(
        family.objective, pipe.scheduler.config, cfg.loss, v_prediction=run.v_pred, label=family.label
    )
    if run.v_pred:
        pipe.scheduler.register_to_config(prediction_type="v_prediction")  # samples during training too
    alphas = getattr(run.objective, "alphas_cumprod", None)
    run.alphas_cumprod = None if alphas is None else alphas.to(accelerator.device)
    run.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    # The VAE keeps its dtype (fp16 SD VAEs overflow; it runs once per image when caching). Frozen base weights
    # need only the compute dtype; diffusers warns about any .to(dtype=...), so cast only when it changes.
    run.vae.to(accelerator.device)
    cast = {"dtype": run.weight_dtype} if run.weight_dtype != torch.float32 else {}
    run.denoiser.to(**cast)
    if not denoiser_joins_after_caching(cfg):
        _denoiser_to_device(run)
    for module in run.text_encoders:
        module.to(accelerator.device, **cast)
    run.vae.requires_grad_(False)
    run.clip_skip = cfg.model.clip_skip if family.uses_clip_skip else 1  # SDXL and FLUX fix their layers


def _check_clip_skip(cfg: TrainConfig, family: Family, pipe) -> None:
    """The config bounds clip_skip by the deepest encoder of any base; this base's own depth is known only once
    it loads (one past its first layer conditions on the token embeddings alone; further, an IndexError in a step)."""
    if not family.uses_clip_skip:
        return
    largest = family.max_clip_skip(pipe) + 1  # kohya numbering: diffusers' count plus one
    if cfg.model.clip_skip > largest:
        raise UserInputError(
            f"model.clip_skip: {cfg.model.clip_skip} skips every layer of this {family.label} base's text encoder; "
            f"give at most {largest} (2, the penultimate layer, is the usual choice)"
        )


def _denoiser_to_device(run: Run) -> None:
    """The denoiser to the device; with blocks_to_swap, all but the swapped blocks, which stay in host memory and
    come only while they run (`train/block_swap.py`)."""
    n, device = run.cfg.training.blocks_to_swap, run.accelerator.device
    if not n:
        run.denoiser.to(device)
        return
    if run.swap is None:
        kinds = run.family.swap_blocks(run.denoiser)
        if kinds is None:
            raise UserInputError(f"training.blocks_to_swap is for FLUX.1's transformer blocks; {run.family.label} has none")
        if run.accelerator.num_processes > 1:
            raise UserInputError("training.blocks_to_swap runs in one process (DDP needs each model on one device)")
        run.swap = BlockSwap(swapped_blocks(*kinds, n), device)
    to_device_except(run.denoiser, device, run.swap.blocks)
    run.swap.install()


def _inject_lora(run: Run) -> None:
    """3. The LoRA (trainable factors in float32) over the base (its Linear weights in 8 bits if asked), and
    gradient checkpointing."""
    quantize_frozen_base(run.denoiser, run.cfg.model.quantize_base)
    run.network = network = create_network(run.pipe, run.cfg.network, run.arch)
    if run.swap is not None:  # peft made the swapped blocks' factors beside their weights, in host memory
        for p in network.named_parameters().values():
            p.data = p.data.to(run.accelerator.device)
    run.train_unet = run.family.denoiser_component in network.plan
    run.train_te = any(c.startswith("text_encoder") for c in network.plan)
    tc = run.cfg.training
    if not tc.gradient_checkpointing:
        return
    enable_checkpointing(run.denoiser, Offload(run.accelerator.device) if tc.cpu_offload_checkpointing else None)
    for te in run.text_encoders if run.train_te else ():
        enable_text_encoder_checkpointing(te)


def caption_embeddings(run: Run, captions: list[str]) -> dict[str, torch.Tensor]:
    """The text conditioning of `captions` as the run's family encodes it for training (differentiable)."""
    ds = run.cfg.dataset
    return text_embeddings(
        run.tokenizers, run.text_encoders, captions, run.clip_skip, ds.max_token_length, family=run.family,
        t5_max_length=ds.t5xxl_max_token_length,
    )  # fmt: skip


def _build_caches(run: Run) -> None:
    """4. Latent and text caches (latents: posterior mean, cached or not, so caching changes speed, never results);
    then the frozen encoders the loop will not call again are dropped."""
    ds, pipe = run.cfg.dataset, run.pipe
    if (
        run.val_index is not None
    ):  # held-out latents (and frozen text outputs) now, before the encoders may go
        loss = run.cfg.loss
        bs = run.cfg.training.train_batch_size
        run.validator = Validator(run.val_index, bs, run.val_seed, loss.min_timestep, loss.max_timestep)
        frozen_text = None if run.train_te else (lambda c: caption_embeddings(run, c))
        run.validator.prepare(lambda px: encode_latents(run.vae, px), frozen_text)
    if ds.cache_latents:
        run.latent_cache = LatentCache(run.vae, to_disk=ds.cache_latents_to_disk, cache_dir=ds.cache_dir)
        _prepare_shared(run, run.latent_cache)
    if ds.cache_text_encoder_outputs:
        run.text_cache = TextEncoderCache(
            run.tokenizers,
            run.text_encoders,
            run.clip_skip,
            to_disk=ds.cache_text_encoder_outputs_to_disk,
            cache_dir=ds.cache_dir,
            max_token_length=ds.max_token_length,
            family=run.family,
            t5_max_length=ds.t5xxl_max_token_length,
        )
        _prepare_shared(run, run.text_cache)
    # Dropped now rather than at the end, so the training steps reuse their memory (for SD1.5 the VAE encoder and
    # CLIP are ~0.6 GB in fp32; kohya likewise moves the VAE off the GPU after caching). Samples during training
    # still need the text encoders and the VAE's decoder.
    sampling = bool(run.cfg.training.sample_every_n_epochs or run.cfg.training.sample_every_n_steps)
    if run.latent_cache is not None:
        run.latent_cache.release_vae()
        if sampling:
            run.vae.encoder = run.vae.quant_conv = None  # decode() uses neither
        else:
            pipe.vae = None
        run.vae = None
    if run.text_cache is not None and not run.train_te and not sampling:
        run.text_cache.release_encoders()
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                setattr(pipe, name, None)
        run.text_encoders = []
    release_memory()  # the caching passes' activations and the dropped weights, back to the OS
    _denoiser_to_device(run)  # it waited on the CPU while the caches were built


def _prepare_shared(run: Run, cache: LatentCache | TextEncoderCache) -> None:
    """Encode a cache once, on the main process; the others read its files, or receive its memory entries."""
    accelerator = run.accelerator
    if accelerator.num_processes == 1:
        cache.prepare(run.index)
        return
    from accelerate.utils import broadcast_object_list

    if accelerator.is_main_process:
        cache.prepare(run.index)
    accelerator.wait_for_everyone()
    if not cache.store.to_disk:
        shared = broadcast_object_list([cache.store.memory if accelerator.is_main_process else None])
        cache.store.memory = shared[0]
    if not accelerator.is_main_process:
        cache.prepare(run.index)  # every entry is valid now: nothing is encoded twice


def _build_data(run: Run) -> None:
    """5. The order of every epoch is a function of (seed, epoch); the loader gets its own generator because
    creating a DataLoader iterator draws a seed, which would shift the global stream dropout uses."""
    tc, accelerator = run.cfg.training, run.accelerator
    run.sampler = ShardedBatchSampler(
        run.index, tc.train_batch_size, tc.seed, accelerator.process_index, accelerator.num_processes
    )
    run.loader = torch.utils.data.DataLoader(
        TrainDataset(run.index, tc.seed, run.latent_cache, run.text_cache),
        batch_sampler=run.sampler,
        collate_fn=collate_batch,
        generator=torch.Generator().manual_seed(tc.seed),
    )
    run.batches_per_epoch = run.sampler.batches_per_epoch
    run.total_steps = tc.total_steps(run.batches_per_epoch)
    run.num_epochs = tc.num_epochs(run.batches_per_epoch)
    if run.main:
        print(describe(run.index, tc))
        plan = sorted(run.network.plan)
        print("  " + ", ".join(f"{c}: {run.network.num_modules(c)} LoRA modules" for c in plan))


def _build_optimizer(run: Run) -> None:
    """6. Optimizer and LR schedule. Only the UNet goes through accelerate's DDP wrapper; text-encoder LoRA
    gradients are averaged by hand, because the text encoders are called through `text_embeddings`, which needs
    the plain modules."""
    cfg, network, accelerator = run.cfg, run.network, run.accelerator
    o = cfg.optimizer
    groups = network.param_groups(o.unet_lr or o.learning_rate, o.text_encoder_lr or o.learning_rate)
    if any(loraplus.ratios(o)):
        names = {id(p): n for n, p in network.named_parameters().items()}
        groups = loraplus.split_groups(groups, names, *loraplus.ratios(o))
    optimizer = make_optimizer(
        o.optimizer_type,
        groups,
        lr=o.learning_rate,
        weight_decay=o.weight_decay,
        betas=o.betas,
        optimizer_args=o.optimizer_args,
    )
    run.lr_scheduler = make_lr_scheduler(
        cfg.scheduler.lr_scheduler,
        optimizer,
        run.total_steps,
        lr_warmup_steps=cfg.scheduler.warmup_steps(run.total_steps),
        num_cycles=cfg.scheduler.lr_scheduler_num_cycles,
        power=cfg.scheduler.lr_scheduler_power,
    )
    run.trained = [network.components[c] for c in sorted(network.plan)]
    if run.train_unet:
        # with block swap the model is placed already: accelerate's placement would move every block
        placement = [run.swap is None, True]
        run.model, run.optimizer = accelerator.prepare(run.denoiser, optimizer, device_placement=placement)
    else:
        run.model, run.optimizer = run.denoiser, accelerator.prepare(optimizer)
    named = network.named_parameters()
    run.params = list(named.values())
    run.te_params = [p for n, p in named.items() if n.startswith("text_encoder")]


def _resume(run: Run) -> None:
    """7. LoRA, optimizer, schedule, every RNG, and the position in the data. Noise and timesteps draw from their
    own CPU generator: the same numbers on any device, and savable. Every process seeds it alike (each draws for
    the whole global batch and keeps its rows), so process 0's saved state is every process's."""
    tc, accelerator = run.cfg.training, run.accelerator
    run.generator = torch.Generator().manual_seed(tc.seed)
    if run.saved is None:
        return
    restore_train_state(
        run.saved,
        load_lora=run.network.load_state_dict,
        optimizer=run.optimizer,
        lr_scheduler=run.lr_scheduler,
        generator=run.generator,
        scaler=accelerator.scaler,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
    )
    run.start = run.saved.progress
    if run.main:
        print(f"  resumed from {run.saved.folder}: epoch {run.start.epoch + 1}, step {run.start.global_step}")


def _open_outputs(run: Run, progress_bar: bool) -> None:
    """8. The output folder (the run's first write), the effective config, the log and the progress bar."""
    cfg, tc = run.cfg, run.cfg.training
    out, name = tc.output_dir, tc.output_name
    run.result = TrainResult(
        lora_path=out / f"{name}.safetensors", arch=run.arch, total_steps=run.total_steps
    )
    run.result.batches_per_epoch = run.batches_per_epoch
    run.metadata = training_metadata(
        cfg, run.index, run.total_steps, run.num_epochs, run.v_pred, run.family.objective
    )
    run.metadata["training_started_at"] = str(int(run.started))
    run.global_step, run.position = run.start.global_step, run.start
    run.lora_saves = SaveRotation(tc.save_last_n_epochs, tc.save_last_n_steps)
    run.state_saves = SaveRotation(tc.save_last_n_epochs_state, tc.save_last_n_steps_state)
    # one process only: a stop on one rank of several would leave the others waiting at the next collective
    run.stop = StopRequest().install() if run.accelerator.num_processes == 1 else StopRequest()
    if not run.main:
        return
    out.mkdir(parents=True, exist_ok=True)
    run.result.config_path = out / f"{name}.toml"
    save_config(cfg, run.result.config_path)
    if tc.logging != "none":
        history = run.saved.folder / "log.csv" if run.saved is not None else None
        run.run_log = RunLog(
            out / "logs" / f"{name}.csv",
            history=history,
            up_to_step=run.start.global_step,
            jsonl=tc.logging == "jsonl",
        )
        run.result.log_csv = run.run_log.csv_path
    if tc.logging == "tensorboard":
        run.accelerator.init_trackers(name, config={"config": json.dumps(config_to_dict(cfg))})
    if progress_bar:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=run.total_steps, initial=run.start.global_step, desc="steps", dynamic_ncols=True)
