"""`scan_dataset`: every usable image of a dataset, with its caption and bucket, as a `DatasetIndex`. Either the
kohya folder layout (`train_data_dir` of '<repeats>_<trigger> <class>' folders, `reg_data_dir`) or
`[[dataset.subsets]]` (kohya's dataset_config): each subset is one folder with its own repeats, class tokens,
caption settings and bucket settings. Regularisation images are balanced against the training images as kohya
does."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from lorafuse.errors import UserInputError
from lorafuse.train.buckets import BucketManager, BucketSpec
from lorafuse.train.data import Augment, DatasetIndex, ImageItem, ImageSource, balance_reg, scan_images
from lorafuse.train.dataset_folders import FOLDER_PATTERN, IMAGE_EXTENSIONS, parse_subset_folder
from lorafuse.utils.kohya_names import REFERENCES_FOLDER, WORLD_DATASET_INFO

log = logging.getLogger(__name__)

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


def _subset_folders(root: Path, role: str) -> list[Path]:
    if not root.is_dir():
        raise UserInputError(f"{root}: {role} does not exist or is not a folder")
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir() if p.is_file()):
        raise UserInputError(
            f"{root}: {role} holds images directly; kohya's layout puts them in subfolders named "
            f"'{FOLDER_PATTERN}' (e.g. {root / '10_sks dog'}). If {root.name} is such a folder, use its parent."
        )
    folders = []
    for p in sorted(root.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if not p.name[:1].isdigit():
            # As kohya: a folder without a repeats prefix is not data. The user hears of it (a forgotten prefix
            # would drop their images), unless it is the references/ that `lorafuse world dataset` writes.
            if not (p.name == REFERENCES_FOLDER and (root / WORLD_DATASET_INFO).is_file()):
                log.warning("%s: ignored, its name does not start with '<repeats>_' (%s)", p, FOLDER_PATTERN)
            continue
        parse_subset_folder(p)  # a name that starts like one but is malformed is an error
        folders.append(p)
    return folders


def _scan_folder(
    folder: Path, cfg: DatasetConfig, buckets: BucketManager, is_reg: bool, skipped: list[tuple[Path, str]]
) -> list[ImageItem]:
    repeats, tokens = parse_subset_folder(folder)
    tokens = cfg.class_tokens or tokens
    source = ImageSource(folder, repeats, tokens, cfg.caption_extension, is_reg, alpha_mask=cfg.alpha_mask)
    return scan_images(source, cfg, buckets, skipped)


def scan_dataset(cfg: DatasetConfig) -> DatasetIndex:
    """Every usable image of train_data_dir (and reg_data_dir) or of the subsets, with its caption and bucket."""
    if cfg.subsets:
        return scan_subsets(cfg)
    spec = BucketSpec(
        cfg.resolution,
        cfg.enable_bucket,
        cfg.min_bucket_reso,
        cfg.max_bucket_reso,
        cfg.bucket_reso_steps,
        cfg.bucket_no_upscale,
    )
    buckets, skipped = BucketManager(spec), []
    train = [
        it
        for f in _subset_folders(cfg.train_data_dir, "train_data_dir")
        for it in _scan_folder(f, cfg, buckets, False, skipped)
    ]
    if not train:
        raise UserInputError(
            f"{cfg.train_data_dir}: no usable training images in folders named '{FOLDER_PATTERN}'"
        )
    reg: list[ImageItem] = []
    if cfg.reg_data_dir is not None:
        reg = [
            it
            for f in _subset_folders(cfg.reg_data_dir, "reg_data_dir")
            for it in _scan_folder(f, cfg, buckets, True, skipped)
        ]
        if not reg:
            raise UserInputError(f"{cfg.reg_data_dir}: reg_data_dir is set but holds no usable images")
        reg = balance_reg(reg, sum(it.repeats for it in train))
    return DatasetIndex(cfg, train + reg, skipped)
