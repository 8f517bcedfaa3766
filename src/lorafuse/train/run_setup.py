"""Pieces of `train_lora` that would interrupt its top-to-bottom reading: batch sharding across processes, the
accelerator, kohya's training metadata. (SDXL's size conditioning is the family's: `families/sdxl.py`.)"""

from __future__ import annotations

import contextlib
import importlib.util
from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple

import torch

from lorafuse.errors import UserInputError
from lorafuse.train.captions import split_tags
from lorafuse.train.config import TrainConfig
from lorafuse.train.data import BucketBatchSampler, DatasetIndex, SampleKey, epoch_batches
from lorafuse.train.optim import make_optimizer


class Shard(NamedTuple):
    """This process's rows [start, end) of a global batch of `total` samples."""

    start: int
    end: int
    total: int
    world: int = 1

    @property
    def share(self) -> float:
        """n_r / N, this process's share of the global batch."""
        return (self.end - self.start) / self.total

    @property
    def loss_scale(self) -> float:
        """world · n_r / N: DDP averages the processes' gradients, so this makes the average the gradient of the
        global batch's mean loss, whatever the split (a process with no rows gets a zero-weight pad sample).
        Exactly 1.0 with one process."""
        return self.world * (self.end - self.start) / self.total


class ShardedBatchSampler(BucketBatchSampler):
    """`BucketBatchSampler` for process `rank` of `world`: the epoch's batches are global batches of
    batch_size · world samples (so one process with batch_size · world sees the same batches), each split into
    contiguous rows, one share per process. Every sample is seen once per epoch; when a global batch has fewer
    samples than processes, a process with none gets the batch's first sample as a pad with loss scale 0.
    `shard(i)` tells which rows of global batch i this process has. With world = 1 it yields exactly
    BucketBatchSampler's batches."""

    def __init__(self, index: DatasetIndex, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        super().__init__(index, batch_size * world, seed)
        self.rank, self.world = rank, world
        self._batches: tuple[int, list[list[int]]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.index.steps_per_epoch(self.batch_size)

    def _global(self) -> list[list[int]]:
        if self._batches is None or self._batches[0] != self.epoch:
            self._batches = (self.epoch, epoch_batches(self.index, self.batch_size, self.seed, self.epoch))
        return self._batches[1]

    def shard(self, i: int) -> Shard:
        """Rows of global batch i (of the current epoch) that this process trains on."""
        total = len(self._global()[i])
        base, extra = divmod(total, self.world)
        start = self.rank * base + min(self.rank, extra)
        return Shard(start, start + base + (self.rank < extra), total, self.world)

    def __iter__(self):
        for i in range(self.skip, self.batches_per_epoch):
            batch, (start, end, _, _) = self._global()[i], self.shard(i)
            yield [SampleKey(self.epoch, sid) for sid in (batch[start:end] if end > start else batch[:1])]

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.skip, 0)


def denoiser_joins_after_caching(cfg: TrainConfig) -> bool:
    """While caches are built the denoiser is not called, so it waits on the CPU and the caching pass has the
    device to the encoders and their activations (kohya likewise). fp8 storage is made on the GPU."""
    ds = cfg.dataset
    return (ds.cache_latents or ds.cache_text_encoder_outputs) and cfg.model.quantize_base != "fp8"


def check_optimizer(name: str, optimizer_args: dict | None = None) -> None:
    # An optimizer on a dummy parameter: a missing package (bitsandbytes, prodigyopt) or a value the class's own
    # checks refuse (optimizer_args) fails here, not after loading.
    make_optimizer(name, [{"params": [torch.zeros(1, requires_grad=True)]}], lr=1e-4, optimizer_args=optimizer_args)


def check_settings(cfg: TrainConfig) -> None:
    """What a run would refuse about its settings and input files, before any model loads; `--dry-run` runs it
    too, so a dry run that passes does not hide a missing base or a broken network_weights file."""
    from lorafuse.models.load import check_base_name
    from lorafuse.train.network_weights import check_network_weights
    from lorafuse.train.saving import check_implemented

    check_implemented(cfg)
    check_optimizer(cfg.optimizer.optimizer_type, cfg.optimizer.optimizer_args)
    if not cfg.model.part_files:  # FLUX.1's separate files are checked by their own loader
        check_base_name(str(cfg.model.pretrained_model_name_or_path))
    check_network_weights(cfg)  # family, modules and ranks against the base's configs
    if cfg.network.network_module == "lycoris.kohya":
        from lorafuse.train.network_lycoris import lycoris_preset

        lycoris_preset(cfg.network.lycoris_preset)  # an unknown preset or a broken preset file


@contextlib.contextmanager
def accelerate_state_scope() -> Iterator[None]:
    """Run a training inside it: afterwards (also after an error) the process holds no accelerate state.

    accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
    mixed_precision, while one process runs several trainings (the tests, the UI worker, the world recipes).
    So each single-process run drops the state it made when it ends. A launched multi-process run keeps it: the
    process group lives as long as the process.
    """
    try:
        yield
    finally:
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
    try:
        return Accelerator(
            # cpu=True when there is no GPU: only then does accelerate join torchrun's processes on gloo (MULTI_CPU)
            cpu=not torch.cuda.is_available(),
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
        # kohya's ss_optimizer spells the arguments out the same way: "Prodigy(decouple=True,d_coef=2)"
        optimizer=o.optimizer_type + (f"({','.join(f'{k}={v}' for k, v in o.optimizer_args.items())})"
                                      if o.optimizer_args else ""),  # fmt: skip
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
