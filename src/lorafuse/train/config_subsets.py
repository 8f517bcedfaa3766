"""`[[dataset.subsets]]`: image folders with their own repeats, class tokens and caption settings, as kohya's
`--dataset_config` subsets (`[[datasets.subsets]]`), so a folder needs no '<repeats>_<tokens>' name.

Every optional field left out (None) takes the `[dataset]` table's value; bucket settings per subset stand for
kohya's per-`[[datasets]]` resolution and buckets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafuse.config.checks import as_paths
from lorafuse.config.checks import bad as _bad
from lorafuse.train import config_limits as lim
from lorafuse.train.dataset_folders import MAX_REPEATS


@dataclass(frozen=True)
class SubsetConfig:
    # folder of images (and caption files beside them); its name needs no '<repeats>_' prefix
    image_dir: Path
    # each image counts this many times per epoch
    num_repeats: int = 1
    # caption of images without a caption file (the trigger and class, e.g. "sks dog")
    class_tokens: str | None = None
    # regularisation images (no trigger; weighted by prior_loss_weight; balanced against the train images)
    is_reg: bool = False
    caption_extension: str | None = None  # None: the [dataset] value
    keep_tokens: int | None = None  # None: the [dataset] value
    shuffle_caption: bool | None = None  # None: the [dataset] value
    caption_dropout_rate: float | None = None  # None: the [dataset] value
    caption_tag_dropout_rate: float | None = None  # None: the [dataset] value
    flip_aug: bool | None = None  # None: the [dataset] value
    random_crop: bool | None = None  # None: the [dataset] value
    # training size of this subset: 512 or [width, height]; None: the [dataset] value
    resolution: int | tuple[int, int] | None = None
    enable_bucket: bool | None = None  # None: the [dataset] value
    min_bucket_reso: int | None = None  # None: the [dataset] value
    max_bucket_reso: int | None = None  # None: the [dataset] value
    bucket_reso_steps: int | None = None  # None: the [dataset] value
    bucket_no_upscale: bool | None = None  # None: the [dataset] value
    alpha_mask: bool | None = None  # None: the [dataset] value
    # loss masks: a folder of images named as this subset's images (white trains, black is ignored; kohya's
    # conditioning_data_dir with masked_loss); wins over alpha_mask
    mask_dir: Path | None = None

    def __post_init__(self) -> None:
        as_paths(self, "image_dir", "mask_dir")
        if not 1 <= self.num_repeats <= MAX_REPEATS:
            raise _bad("num_repeats", f"must be in [1, {MAX_REPEATS}], got {self.num_repeats}")
        lim.check_at_most(self, lim.MAX_SIDE, lim.SIDE_WHY, "resolution", "min_bucket_reso",
                          "max_bucket_reso", "bucket_reso_steps", hint=lim.SIDE_HINT)  # fmt: skip
        if self.keep_tokens is not None and self.keep_tokens < 0:
            raise _bad("keep_tokens", f"must be >= 0, got {self.keep_tokens}")
        for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value <= 1.0:
                raise _bad(key, f"must be in [0, 1], got {value}")
        if self.caption_extension is not None and not self.caption_extension.startswith("."):
            raise _bad("caption_extension", f"must start with '.', got {self.caption_extension!r}")

    def resolved(self, dataset: object) -> dict:
        """Every optional setting with the dataset's value filled in."""
        out = {}
        for key, value in vars(self).items():
            if key in ("image_dir", "num_repeats", "class_tokens", "is_reg", "mask_dir"):
                continue
            out[key] = getattr(dataset, key) if value is None else value
        return out
