"""Pieces of `train_lora` that would interrupt its top-to-bottom reading: batch sharding across processes, the
accelerator, kohya's training metadata. (SDXL's size conditioning is the family's: `families/sdxl.py`.)"""

from __future__ import annotations

import importlib.util
import math
from collections import Counter

import torch

from lorafuse.errors import UserInputError
from lorafuse.train.captions import split_tags
from lorafuse.train.config import TrainConfig
from lorafuse.train.data import BucketBatchSampler, DatasetIndex, SampleKey, epoch_batches
from lorafuse.train.optim import make_optimizer


class ShardedBatchSampler(BucketBatchSampler):
    """`BucketBatchSampler` for process `rank` of `world`: batch i of an epoch goes to process i % world, the list
    padded by repeating its first batches so every process runs the same number of steps (as accelerate does).
    `skip_batches` counts this process's batches. With world = 1 it yields exactly BucketBatchSampler's batches."""

    def __init__(self, index: DatasetIndex, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        super().__init__(index, batch_size, seed)
        self.rank, self.world = rank, world

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.index.steps_per_epoch(self.batch_size) / self.world)

    def __iter__(self):
        batches = epoch_batches(self.index, self.batch_size, self.seed, self.epoch)
        padded = [batches[i % len(batches)] for i in range(self.batches_per_epoch * self.world)]
        for batch in padded[self.rank :: self.world][self.skip :]:
            yield [SampleKey(self.epoch, sid) for sid in batch]

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.skip, 0)


def check_optimizer(name: str) -> None:
    # An optimizer on a dummy parameter: a missing package (bitsandbytes, prodigyopt) fails here, not after loading.
    make_optimizer(name, [{"params": [torch.zeros(1, requires_grad=True)]}], lr=1e-4)


def _forget_single_process_state() -> None:
    # accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
    # mixed_precision; one process runs several trainings (the tests, the UI worker, the world recipes), so a
    # single-process state from an earlier run is dropped. A launched multi-process run keeps its state.
    from accelerate.state import AcceleratorState, PartialState

    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state()


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    log_with = None
    if cfg.training.logging == "tensorboard":
        if (
            importlib.util.find_spec("tensorboard") is None
            and importlib.util.find_spec("tensorboardX") is None
        ):
            raise UserInputError(
                "training.logging = 'tensorboard' needs the tensorboard package (pip install tensorboard)"
            )
        log_with = "tensorboard"
    _forget_single_process_state()
    try:
        return Accelerator(
            mixed_precision=cfg.training.mixed_precision,
            log_with=log_with,
            project_dir=str(cfg.training.output_dir / "logs"),
        )
    except ValueError as e:  # e.g. fp16 on a machine without a GPU
        raise UserInputError(f"training.mixed_precision = {cfg.training.mixed_precision!r}: {e}") from e


_FLOW_KEYS = ("timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "model_prediction_type",
              "weighting_scheme", "logit_mean", "logit_std", "mode_scale")  # fmt: skip


def training_metadata(
    cfg: TrainConfig, index: DatasetIndex, total_steps: int, num_epochs: int, v_pred: bool, objective: str = "epsilon"
) -> dict:
    """kohya's ss_* training record; a flow-matching objective adds its sampling settings, as kohya's FLUX trainer."""
    o, ds, tc = cfg.optimizer, cfg.dataset, cfg.training
    flow = {k: getattr(cfg.loss, k) for k in _FLOW_KEYS} if objective == "flow" else {}
    if flow:
        flow["guidance_scale"] = cfg.model.guidance_scale
    dirs: Counter[str] = Counter(it.path.parent.name for it in index.items if not it.is_reg)
    repeats = {it.path.parent.name: it.repeats for it in index.items if not it.is_reg}
    tags: dict[str, Counter[str]] = {}
    for it in index.items:
        tags.setdefault(it.path.parent.name, Counter()).update(split_tags(it.caption))
    return dict(
        learning_rate=o.learning_rate,
        unet_lr=o.unet_lr or o.learning_rate,
        text_encoder_lr=o.text_encoder_lr or o.learning_rate,
        max_train_steps=total_steps,
        epochs=num_epochs,
        batch_size=tc.train_batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        lr_scheduler=cfg.scheduler.lr_scheduler,
        lr_warmup_steps=cfg.scheduler.warmup_steps(total_steps),
        optimizer=o.optimizer_type,
        mixed_precision=tc.mixed_precision,
        seed=tc.seed,
        noise_offset=cfg.loss.noise_offset,
        min_snr_gamma=cfg.loss.min_snr_gamma,
        loss_type=cfg.loss.loss_type,
        huber_c=cfg.loss.resolved_huber_c if cfg.loss.loss_type in ("huber", "smooth_l1") else None,
        huber_schedule=cfg.loss.resolved_huber_schedule
        if cfg.loss.loss_type in ("huber", "smooth_l1")
        else None,
        network_dropout=cfg.network.network_dropout,
        caption_dropout_rate=ds.caption_dropout_rate,
        num_train_images=index.num_train_samples,
        num_reg_images=index.num_reg_samples,
        base_model=cfg.model.pretrained_model_name_or_path,
        output_name=tc.output_name,
        dataset_dirs={d: {"n_repeats": repeats[d], "img_count": n} for d, n in sorted(dirs.items())},
        tag_frequency={d: dict(c) for d, c in sorted(tags.items())},
        resolution=ds.resolution,
        clip_skip=cfg.model.clip_skip,
        v_parameterization=None if flow else v_pred,  # rectified flow is neither ε nor v (no prediction_type)
        trigger_phrase=ds.trigger,
        **flow,
    )
