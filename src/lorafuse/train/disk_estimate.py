"""Disk space a training run will write, estimated before any model loads; `check_disk_space` refuses a run
whose output_dir (or disk-cache folder) has too little free, with one message naming the folder.

    LoRA files    the network's parameters at save_precision (counted on the base built on the meta device, as
                  the memory estimate counts them), each module's alpha, the header and the ss_* metadata; times
                  the files the run keeps at once (the final one, save_every_n_* saves less save_last_n_* pruning)
    states        (save_state) the LoRA in float32, the optimizer's moments (`estimate.optimizer_bytes`), the RNG
                  streams, progress.json and the log; times the state folders kept at once
    samples       one labelled grid per sampling (sample_every_n_*), its PNG bound
    logs          the CSV/JSONL log, the loss plot and the effective config
    disk caches   (cache_*_to_disk) per image: its latents (x2 with flip_aug) and mask, its text-encoder outputs;
                  in their own folders (beside the images, or cache_dir)
Every term is an upper bound; the estimate is counted from step 0 even on resume, and ignores caches already
on disk (they may be rewritten). A base whose architecture cannot be read from its configs is sized by the
network `prepare` has built, before the first step (`network=`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafuse.errors import UserInputError
from lorafuse.train.config import TrainConfig
from lorafuse.train.data import DatasetIndex
from lorafuse.utils.atomic import check_output, png_bytes, same_filesystem

# A safetensors header entry is the key plus '{"dtype":"F32","shape":[..],"data_offsets":[..,..]}' (< 100 bytes);
# a kohya key is longer than peft's parameter name by its "lora_unet_" style prefix (< 28 bytes)
_HEADER_ENTRY = 128
# what a LoRA save adds to the ss_* training record: ss_network_*, modelspec.*, base hashes, lr at the save
_METADATA_EXTRA = 16 << 10
# the ss_* training record less its dataset part (tags, folders): for a run planned before its dataset exists
PLANNED_RECORD = 8 << 10
# torch.save's zip record per tensor: local and central headers, the record name, 64-byte alignment
_TORCH_RECORD = 512
# progress.json's RNG streams: Python's and numpy's Mersenne Twister states (625 and 624 integers of up to
# 10 digits, one per indented line) and torch's, plus the resume fields
_RNG_JSON = 48 << 10
# a log row (step, epoch, loss, its average, two lrs, seconds, validation loss) in CSV or JSONL; TensorBoard's
# event records of the same scalars
_LOG_ROW = 256
_TENSORBOARD_ROW = 1024
_LOSS_PLOT = (800, 450, 4)  # `RunLog.plot`: 8 x 4.5 inches at 100 dpi, RGBA


@dataclass
class DiskEstimate:
    """Bytes by part in output_dir, and per disk-cache folder."""

    parts: dict[str, int] = field(default_factory=dict)
    caches: dict[Path, int] = field(default_factory=dict)

    @property
    def output(self) -> int:
        return sum(self.parts.values())


def _kept(events: int, alive: int | None) -> int:
    """Saves on disk at once: `events` saves of which `alive` stay (None: all), plus the newest, written before
    the oldest goes."""
    return events if alive is None else min(events, alive + 1)


def lora_file_bytes(params: dict[str, Any], itemsize: int, metadata: int) -> int:
    """A LoRA file of these parameters (name -> tensor or shape-only tensor) at `itemsize` bytes per element: the
    tensors, one alpha per module (one per two factors, counted per parameter to stay an upper bound), the header."""
    tensors = sum(p.numel() * itemsize for p in params.values())
    header = sum(2 * (len(name) + _HEADER_ENTRY) + 4 for name in params)
    return tensors + header + metadata + _METADATA_EXTRA


def state_folder_bytes(params: dict[str, Any], optimizer: str, config: int, log: int) -> int:
    """A `checkpoint.save_train_state` folder: the parameters in float32, the optimizer's state in torch.save's
    records (its moments and a step per parameter), progress.json (the config of `config` characters, written
    with indentation, and the RNG streams) and the log of `log` bytes."""
    from lorafuse.train.estimate import optimizer_bytes

    moments = optimizer_bytes(optimizer, list(params.values()))
    return lora_file_bytes(params, 4, 0) + moments + 3 * _TORCH_RECORD * len(params) + 2 * config + _RNG_JSON + log


def _save_counts(cfg: TrainConfig, batches: int) -> tuple[int, int, int, int]:
    """(LoRA files, state folders, sample grids, log rows) of a run of `batches` micro-batches an epoch."""
    tc = cfg.training
    total, epochs = tc.total_steps(batches), tc.num_epochs(batches)
    step_saves = (total - 1) // tc.save_every_n_steps if tc.save_every_n_steps else 0
    epoch_saves = (epochs - 1) // tc.save_every_n_epochs if tc.save_every_n_epochs else 0
    # `SaveRotation`: save_last_n_epochs keeps that many epoch saves; save_last_n_steps keeps the step saves of
    # the last N steps, which are N // save_every_n_steps + 1 saves at most
    def steps_alive(last_n: int | None) -> int | None:
        return None if last_n is None or not tc.save_every_n_steps else last_n // tc.save_every_n_steps + 1

    loras = 1 + _kept(step_saves, steps_alive(tc.save_last_n_steps)) + _kept(epoch_saves, tc.save_last_n_epochs)
    states = 0
    if tc.save_state:
        states = 1 + _kept(step_saves, steps_alive(tc.save_last_n_steps_state)) + _kept(
            epoch_saves, tc.save_last_n_epochs_state
        )
    samples = (total // tc.sample_every_n_steps if tc.sample_every_n_steps else 0) + (
        epochs // tc.sample_every_n_epochs if tc.sample_every_n_epochs else 0
    )
    return loras, states, samples, total


def estimate_disk(cfg: TrainConfig, index: DatasetIndex, comps: dict, network: Any) -> DiskEstimate:
    """The run's disk use; `comps`: the base's components (on the meta device or loaded), `network`: its LoRA.
    Counted for one process (the most steps an epoch)."""
    from lorafuse.families import family_of
    from lorafuse.train.run_setup import training_metadata

    tc = cfg.training
    batches = index.steps_per_epoch(tc.train_batch_size)
    record = training_metadata(cfg, index, tc.total_steps(batches), tc.num_epochs(batches), True,
                               family_of(comps).objective)  # fmt: skip
    est = estimate_outputs(cfg, batches, len(json.dumps({k: str(v) for k, v in record.items()})), network)
    est.caches = _cache_bytes(cfg, index, comps)
    return est


def estimate_outputs(cfg: TrainConfig, batches: int, metadata: int, network: Any) -> DiskEstimate:
    """output_dir's part of the estimate, for a run of `batches` micro-batches an epoch whose ss_* record takes
    `metadata` bytes: also for planning a run whose dataset is not written yet (`demo`)."""
    from lorafuse.config.toml_io import config_to_dict
    from lorafuse.train.saving import save_dtype
    from lorafuse.utils.images import grid_size

    tc, est = cfg.training, DiskEstimate()
    loras, states, samples, steps = _save_counts(cfg, batches)
    params = network.named_parameters()
    config = len(json.dumps(config_to_dict(cfg), indent=1))
    est.parts["LoRA files"] = loras * lora_file_bytes(params, save_dtype(tc.save_precision).itemsize, metadata)
    log = steps * (_TENSORBOARD_ROW if tc.logging == "tensorboard" else _LOG_ROW) if tc.logging != "none" else 0
    if states:
        est.parts["states"] = states * state_folder_bytes(params, cfg.optimizer.optimizer_type, config, log)
    if samples:
        w, h = cfg.dataset.size
        labels = [p if len(p) <= 40 else p[:40] for p in tc.sample_prompts]
        est.parts["samples"] = samples * png_bytes(*grid_size(len(labels), 1, (w, h), labels, title="t"))
    est.parts["logs"] = log + png_bytes(*_LOSS_PLOT) + config
    return est


def _cache_bytes(cfg: TrainConfig, index: DatasetIndex, comps: dict) -> dict[Path, int]:
    """Bytes per folder of the cache_*_to_disk files: float32 latents (x2 with the subset's flip_aug) and the
    uint8 mask at the bucket's size; float32 text-encoder outputs (the sequence and a pooled vector no wider)."""
    from lorafuse.families import family_of
    from lorafuse.train.estimate import _step_shape

    ds = cfg.dataset
    if not (ds.cache_latents_to_disk or ds.cache_text_encoder_outputs_to_disk):
        return {}
    vae = comps["vae"]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    _, _, (tokens, width) = _step_shape(cfg, comps[family_of(comps).denoiser_component], vae)
    out: dict[Path, int] = {}
    for item in index.items:
        if item.repeats == 0:
            continue  # never asked for, never cached
        w, h = item.assignment.bucket
        n = 0
        if ds.cache_latents_to_disk:
            flips = 2 if index.augments[item.subset].flip_aug else 1
            n += flips * vae.config.latent_channels * math.ceil(h / factor) * math.ceil(w / factor) * 4
            n += w * h if item.mask is not None else 0
            n += 4 * _HEADER_ENTRY + 1024  # three tensors' entries and the validity key
        if ds.cache_text_encoder_outputs_to_disk:
            n += (tokens + 1) * width * 4 + 4 * _HEADER_ENTRY + 1024
        folder = ds.cache_dir if ds.cache_dir is not None else item.path.parent
        out[folder] = out.get(folder, 0) + n
    return out


def meta_network(cfg: TrainConfig) -> tuple[dict, Any] | None:
    """(the base's components on the meta device, the run's LoRA over them), or None when the base's
    architecture cannot be read from its configs."""
    from lorafuse.families import family_of
    from lorafuse.models.meta import meta_components
    from lorafuse.train.estimate import _lora

    try:
        comps = meta_components(cfg.model.pretrained_model_name_or_path)
    except UserInputError:
        return None
    try:
        return comps, _lora(comps, cfg, family_of(comps))
    except (NotImplementedError, RuntimeError):  # a network whose construction reads weight values, not only
        return None  # shapes ("cannot copy out of meta tensor"): sized once it is built for real


def check_disk_space(cfg: TrainConfig, index: DatasetIndex, comps: dict, network: Any) -> DiskEstimate:
    """Refuse the run (`OutputError` naming the folder) if output_dir or a disk-cache folder has less free space
    than the estimate; caches on output_dir's filesystem count against it too."""
    est = estimate_disk(cfg, index, comps, network)
    out = cfg.training.output_dir
    shared = sum(n for folder, n in est.caches.items() if same_filesystem(folder, out))
    check_output(out, kind="folder", what="training.output_dir", estimate=est.output + shared)
    for folder, n in sorted(est.caches.items()):
        check_output(folder, kind="folder", what="disk cache (cache_*_to_disk)", estimate=n)
    return est
