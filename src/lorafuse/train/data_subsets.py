"""`scan_dataset` for `[[dataset.subsets]]` (kohya's dataset_config): each subset is one folder with its own
repeats, class tokens, caption settings and bucket settings; regularisation subsets are balanced as kohya does."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorafuse.errors import UserInputError
from lorafuse.train.buckets import BucketManager, BucketSpec
from lorafuse.train.data import Augment, DatasetIndex, ImageItem, ImageSource, balance_reg, scan_images

if TYPE_CHECKING:
    from lorafuse.train.config import DatasetConfig


def _bucket_spec(settings: dict) -> BucketSpec:
    return BucketSpec(
        settings["resolution"],
        settings["enable_bucket"],
        settings["min_bucket_reso"],
        settings["max_bucket_reso"],
        settings["bucket_reso_steps"],
        settings["bucket_no_upscale"],
    )


def scan_subsets(cfg: DatasetConfig) -> DatasetIndex:
    """Every usable image of every subset, with its caption, bucket and subset settings."""
    managers: dict[BucketSpec, BucketManager] = {}
    train: list[ImageItem] = []
    reg: list[ImageItem] = []
    augments: list[Augment] = []
    skipped: list = []
    for i, sub in enumerate(cfg.subsets):
        where = f"dataset.subsets[{i}] ({sub.image_dir})"
        if not sub.image_dir.is_dir():
            raise UserInputError(f"{where}: image_dir does not exist or is not a folder")
        settings = sub.resolved(cfg)
        # The folder layout's checks, per subset: sizes and bucket ranges must agree.
        size = (
            (settings["resolution"],) * 2
            if isinstance(settings["resolution"], int)
            else settings["resolution"]
        )
        if any(side <= 0 or side % 8 for side in size):
            raise UserInputError(
                f"{where}: resolution must be a positive multiple of 8, got {settings['resolution']}"
            )
        spec = _bucket_spec(settings)
        buckets = managers.setdefault(spec, BucketManager(spec))
        augments.append(Augment.of(settings))
        source = ImageSource(
            sub.image_dir, sub.num_repeats, sub.class_tokens, settings["caption_extension"], sub.is_reg, i,
            settings["alpha_mask"], sub.mask_dir,
        )  # fmt: skip
        items = scan_images(source, cfg, buckets, skipped)
        (reg if sub.is_reg else train).extend(items)
    if not train:
        raise UserInputError("dataset.subsets: no usable training images (every subset is empty or is_reg)")
    if reg:
        reg = balance_reg(reg, sum(it.repeats for it in train))
    return DatasetIndex(cfg, train + reg, skipped, augments)
