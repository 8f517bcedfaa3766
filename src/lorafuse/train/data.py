"""Training data in kohya's folder layout: scan, bucket, and serve deterministic batches.

    train_data_dir/
      10_sks dog/          <repeats>_<trigger> <class>: every image counts 10 times per epoch
        001.png  001.txt   caption beside the image (caption_extension), else the folder's tokens

`scan_dataset` reads the folders once (checking every image decodes); `epoch_batches(index, batch, seed, epoch)`
is the whole order of an epoch as a pure function, so a resumed run can skip the batches already done and see
exactly what an uninterrupted run would. `TrainDataset` takes `SampleKey(epoch, sample)` keys from
`BucketBatchSampler`, so flips, crops and caption shuffles also depend only on (seed, epoch, sample).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from lorafuse.errors import UserInputError
from lorafuse.train import captions as cap
from lorafuse.train import masks
from lorafuse.train.buckets import (
    BucketAssignment,
    BucketManager,
    Size,
    crop_offset,
    resize_and_crop,
)

# the folder layout, shared with `lorafuse dataset` (which must not import torch)
from lorafuse.train.dataset_folders import IMAGE_EXTENSIONS
from lorafuse.train.images import image_frames, load_rgb
from lorafuse.utils.atomic import TMP_PREFIX
from lorafuse.utils.inputs import problem_with_file

if TYPE_CHECKING:
    from lorafuse.train.cache import LatentCache, TextEncoderCache
    from lorafuse.train.config import DatasetConfig, TrainingConfig
    from lorafuse.train.masks import MaskSource

log = logging.getLogger(__name__)

_CACHE_FILE = re.compile(r"^.+\.(" + "|".join(e[1:] for e in IMAGE_EXTENSIONS) + r")\.[a-z_]+\.safetensors$", re.I)
# Independent random streams per sample, so turning one augmentation on does not change the others.
_ORDER, _FLIP, _CROP, _CAPTION = 0, 1, 2, 3


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str  # after the class-token fallback and trigger injection; shuffles and dropout come per epoch
    size: Size  # original (width, height)
    assignment: BucketAssignment
    repeats: int  # for reg images: after balancing against the train images, as kohya (0 = unused)
    is_reg: bool
    subset: int = 0  # index into DatasetIndex.augments: the caption and image settings of its subset
    mask: MaskSource = None  # loss mask: a mask image, "alpha" (its own alpha channel) or None (train.masks)


@dataclass(frozen=True)
class Augment:
    """Per-subset caption and image settings (one for the whole dataset in the folder layout)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    flip_aug: bool = False
    random_crop: bool = False

    @classmethod
    def of(cls, settings: object) -> Augment:
        """From a DatasetConfig, or a dict of a subset's resolved settings."""
        get = settings.get if isinstance(settings, dict) else lambda k: getattr(settings, k)
        return cls(**{k: get(k) for k in cls.__dataclass_fields__})


@dataclass
class DatasetIndex:
    config: DatasetConfig
    items: list[ImageItem]
    samples: list[int] = field(init=False)  # item index of each sample of one epoch, repeats expanded
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    augments: list[Augment] = field(default_factory=list)  # per subset; empty: the dataset's settings
    has_masks: bool = field(init=False)  # any loss mask: then every sample carries one (ones if it has none)

    def __post_init__(self) -> None:
        self.samples = [i for i, item in enumerate(self.items) for _ in range(item.repeats)]
        self.has_masks = any(item.mask is not None for item in self.items)
        if not self.augments:
            self.augments = [Augment.of(self.config)]

    @property
    def num_train_samples(self) -> int:
        return sum(it.repeats for it in self.items if not it.is_reg)

    @property
    def num_reg_samples(self) -> int:
        return sum(it.repeats for it in self.items if it.is_reg)

    def bucket_counts(self) -> dict[Size, int]:
        return dict(sorted(Counter(self.items[i].assignment.bucket for i in self.samples).items()))

    def steps_per_epoch(self, batch_size: int) -> int:
        return steps_per_epoch(self.bucket_counts().values(), batch_size)


def steps_per_epoch(samples: int | Iterable[int], batch_size: int) -> int:
    """Batches per epoch: ceil(Σ images · repeats / batch) for one bucket; with several buckets, batches never
    mix buckets, so it is Σ over buckets of ceil(n_bucket / batch), as kohya's dataloader length."""
    counts = [samples] if isinstance(samples, int) else list(samples)
    return sum(math.ceil(n / batch_size) for n in counts)


def describe(index: DatasetIndex, training: TrainingConfig) -> str:
    """The numbers kohya's train_network.py prints before training."""
    spe = index.steps_per_epoch(training.train_batch_size)
    lines = [
        f"num train images * repeats: {index.num_train_samples}",
        f"num reg images: {index.num_reg_samples}",
        f"num batches per epoch: {spe}",
        f"num epochs: {training.num_epochs(spe)}",
        f"batch size per device: {training.train_batch_size}",
        f"gradient accumulation steps = {training.gradient_accumulation_steps}",
        f"total optimization steps: {training.total_steps(spe)}",
    ]
    if len(index.bucket_counts()) > 1 or index.config.enable_bucket:
        lines += [f"bucket {w}x{h}: {n}" for (w, h), n in index.bucket_counts().items()]
    return "\n".join("  " + line for line in lines)


def _ours(name: str) -> bool:
    """Latent / text-encoder cache files (cache.py names them '<image name>.<kind>.safetensors') and our
    temporaries: written by lorafuse beside the images, so not the user's files to account for."""
    return name.startswith(TMP_PREFIX) or bool(_CACHE_FILE.match(name))


def _sort_entries(folder: Path, cfg: DatasetConfig, skipped: list[tuple[Path, str]]) -> list[Path]:
    """The images of a concept folder. Every other entry is named in a warning with the reason (and kept in
    `skipped` for dangling links), so no file is ever left out without a word."""
    entries = sorted(folder.iterdir())
    images = [p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()]
    stems = {p.stem for p in images}
    usable = []
    for path in entries:
        if _ours(path.name):
            continue
        if path.name.startswith("._"):  # macOS writes these beside every file it copies to a foreign disk
            log.warning("%s: ignored, a macOS metadata file (AppleDouble '._' file), not an image", path)
        elif path in images:
            problem = problem_with_file(path, "image")
            if problem is None:
                usable.append(path)
                continue
            if cfg.on_bad_image == "fail":
                raise UserInputError(f"{path}: {problem}; fix or remove it, or set on_bad_image = 'skip'")
            log.warning("%s: skipped, %s", path, problem)
            skipped.append((path, problem))
        elif path.is_dir():
            log.warning("%s: ignored, a folder inside a concept folder (kohya reads only the images directly in it)", path)
        elif path.suffix.lower() in cap.CAPTION_EXTENSIONS:
            if path.stem not in stems:
                log.warning("%s: ignored, a caption file with no image named %s.*", path, path.stem)
        elif path.is_symlink() and not path.exists():
            log.warning("%s: ignored, a symbolic link to %s, which does not exist", path, os.readlink(path))
        else:
            log.warning("%s: ignored, not an image (%s) nor a caption", path, ", ".join(IMAGE_EXTENSIONS))
    return usable


@dataclass(frozen=True)
class ImageSource:
    """One folder of images and how its items are made: a '<repeats>_<tokens>' folder or a dataset subset."""

    folder: Path
    repeats: int
    fallback: str | None  # caption of images without a caption file
    caption_extension: str
    is_reg: bool
    subset: int = 0
    alpha_mask: bool = False
    mask_dir: Path | None = None


def scan_images(
    source: ImageSource, cfg: DatasetConfig, buckets: BucketManager, skipped: list[tuple[Path, str]]
) -> list[ImageItem]:
    """The usable images of one folder with their captions and buckets."""
    folder, repeats, fallback, is_reg = source.folder, source.repeats, source.fallback, source.is_reg
    images = _sort_entries(folder, cfg, skipped)
    if not images:
        log.warning("%s: no images (%s)", folder, ", ".join(IMAGE_EXTENSIONS))
    items, uncaptioned, opaque = [], [], []
    for path in images:
        notes: list[str] = []
        try:
            size = load_rgb(path, notes).size
            assignment = buckets.assign(size)
            frames = image_frames(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            if cfg.on_bad_image == "fail":
                raise UserInputError(
                    f"{path}: cannot use this image ({e}); fix or remove it, or set on_bad_image = 'skip'"
                ) from e
            log.warning("%s: skipped, cannot use this image (%s)", path, e)
            skipped.append((path, str(e)))
            continue
        if notes:
            log.warning("%s: %s (the image is used as decoded)", path, "; ".join(notes))
        if frames > 1:  # the first frame is a real picture of the subject; refusing would drop it silently too
            log.warning("%s: animated image with %d frames; only the first frame is used", path, frames)
        text = cap.read_caption(path, source.caption_extension)
        if text is None:
            if fallback is None:
                raise UserInputError(
                    f"{path}: no {source.caption_extension} caption file, and its subset sets no class_tokens "
                    "to use instead; add captions or set class_tokens"
                )
            uncaptioned.append(path)
            text = fallback
        if not is_reg:  # regularisation images teach the class prior: no trigger word
            text = cap.inject_trigger(text, cfg.trigger)
        mask = masks.mask_source(path, source.alpha_mask, source.mask_dir)
        if mask == "alpha" and not masks.file_has_alpha(path):
            opaque.append(path)
        items.append(ImageItem(path, text, size, assignment, repeats, is_reg, source.subset, mask))
    masks.report_unmasked(folder, opaque)
    masks.report_orphan_masks(source.mask_dir, images)
    _report_upscaled(folder, items, len(images))
    if uncaptioned:
        other = cap.other_caption_file(uncaptioned[0], source.caption_extension)
        hint = f" ({other.name} exists: is caption_extension right?)" if other else ""
        log.warning(
            "%s: %d of %d images have no %s caption, using '%s'%s",
            folder,
            len(uncaptioned),
            len(images),
            source.caption_extension,
            fallback,
            hint,
        )
    return items


# An image stretched more than this to cover its bucket trains as a blur of a few pixels (a 1x1 thumbnail, a
# 4000x2 strip): legal, but never what the user meant, so it is named.
MAX_UPSCALE = 4.0


def _report_upscaled(folder: Path, items: list[ImageItem], total: int) -> None:
    blown = [(it.assignment.resized[0] / it.size[0], it) for it in items]
    blown = sorted(((f, it) for f, it in blown if f > MAX_UPSCALE), key=lambda x: -x[0])
    if blown:
        f, it = blown[0]
        log.warning(
            "%s: %d of %d images are upscaled more than %gx to fill their bucket (e.g. %s: %dx%d to %dx%d, %.0fx); "
            "they will train as blurs. Use larger images or a lower resolution",
            folder, len(blown), total, MAX_UPSCALE, it.path.name, *it.size, *it.assignment.resized, f,
        )  # fmt: skip


def balance_reg(reg: list[ImageItem], num_train: int) -> list[ImageItem]:
    """kohya's rule: use reg images (with their repeats) until they match the train samples, adding one repeat
    per image in turn when there are too few; images not reached get 0 repeats."""
    repeats = [0] * len(reg)
    n, first = 0, True
    while reg and n < num_train:
        for i, item in enumerate(reg):
            step = item.repeats if first else 1
            repeats[i] += step
            n += step
            if n >= num_train:
                break
        first = False
    return [replace(it, repeats=r) for it, r in zip(reg, repeats, strict=True)]


def _rng(seed: int, epoch: int, sample: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, sample, stream])


def epoch_batches(index: DatasetIndex, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches (lists of sample ids) of `epoch`, a pure function of (seed, epoch), as kohya: shuffle within
    each bucket, cut into batches (the last one of a bucket may be short), then shuffle the batches."""
    rng = _rng(seed, epoch, 0, _ORDER)
    by_bucket: dict[Size, list[int]] = {}
    for sid, item_idx in enumerate(index.samples):
        by_bucket.setdefault(index.items[item_idx].assignment.bucket, []).append(sid)
    batches = []
    for bucket in sorted(by_bucket):
        ids = [by_bucket[bucket][i] for i in rng.permutation(len(by_bucket[bucket]))]
        batches += [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class SampleKey(NamedTuple):
    epoch: int
    sample: int


class BucketBatchSampler(torch.utils.data.Sampler[list[SampleKey]]):
    """Batches of one bucket each. Call `set_epoch(e, skip_batches=k)` before iterating (k > 0 on resume)."""

    def __init__(self, index: DatasetIndex, batch_size: int, seed: int):
        self.index, self.batch_size, self.seed = index, batch_size, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for batch in epoch_batches(self.index, self.batch_size, self.seed, self.epoch)[self.skip :]:
            yield [SampleKey(self.epoch, sid) for sid in batch]

    def __len__(self) -> int:
        return max(self.index.steps_per_epoch(self.batch_size) - self.skip, 0)


def image_tensor(
    item: ImageItem, flip: bool, crop_rng: np.random.Generator | None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, H, W) float32 in [-1, 1] at the item's bucket size, and the crop's (left, top) in resized pixels."""
    offset = crop_offset(item.assignment.resized, item.assignment.bucket, crop_rng)
    img = resize_and_crop(load_rgb(item.path), item.assignment, offset)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())  # (H, W, 3) in [0, 255]
    return (arr.permute(2, 0, 1) / 127.5 - 1.0).contiguous(), offset


class TrainDataset(torch.utils.data.Dataset):
    """Map-style dataset keyed by `SampleKey`; use with `BucketBatchSampler` and `collate_batch`."""

    def __init__(
        self,
        index: DatasetIndex,
        seed: int,
        latent_cache: LatentCache | None = None,
        text_cache: TextEncoderCache | None = None,
    ):
        self.index, self.seed, self.cfg = index, seed, index.config
        self.latent_cache, self.text_cache = latent_cache, text_cache

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, key: SampleKey | tuple[int, int]) -> dict[str, Any]:
        epoch, sid = key
        item_idx = self.index.samples[sid]
        item, cfg = self.index.items[item_idx], self.cfg
        aug = self.index.augments[item.subset]
        flip = aug.flip_aug and bool(_rng(self.seed, epoch, sid, _FLIP).random() < 0.5)
        out: dict[str, Any] = {"path": str(item.path), "sample": sid, "is_reg": item.is_reg}
        if self.latent_cache is not None:
            out["latents"] = self.latent_cache.get(item_idx, flip)
            offset = crop_offset(item.assignment.resized, item.assignment.bucket, None)
        else:
            crop_rng = _rng(self.seed, epoch, sid, _CROP) if aug.random_crop else None
            out["pixel_values"], offset = image_tensor(item, flip, crop_rng)
        if self.index.has_masks:
            out["mask"] = masks.sample_mask(self.index, item_idx, flip, offset, self.latent_cache)
        caption_rng = _rng(self.seed, epoch, sid, _CAPTION)
        out["caption"] = cap.process_caption(
            item.caption,
            caption_rng,
            shuffle=aug.shuffle_caption,
            keep_tokens=aug.keep_tokens,
            tag_dropout_rate=aug.caption_tag_dropout_rate,
            dropout_rate=aug.caption_dropout_rate,
        )
        if self.text_cache is not None:
            out["text"] = self.text_cache.get(item_idx)
        out["loss_weight"] = cfg.prior_loss_weight if item.is_reg else 1.0
        # SDXL's size conditioning, (height, width) order as diffusers; the crop is in resized pixels.
        w, h = item.size
        out["original_size"], out["crop_top_left"] = (h, w), (offset[1], offset[0])
        out["target_size"] = (item.assignment.bucket[1], item.assignment.bucket[0])
        return out


def collate_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors (one bucket per batch, so shapes agree); keep strings and tuples as lists."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], dict):
            out[key] = {k: torch.stack([v[k] for v in values]) for k in values[0]}
        elif key == "loss_weight":
            out[key] = torch.tensor(values, dtype=torch.float32)
        else:
            out[key] = values
    return out
