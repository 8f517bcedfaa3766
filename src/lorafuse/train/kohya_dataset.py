"""kohya's `--dataset_config` TOML ([general], [[datasets]], [[datasets.subsets]]) as our [dataset] table and
[[dataset.subsets]].

kohya resolves every setting subset -> dataset -> [general] -> command line -> default. Here [general] (over the
flat config's keys) fills our [dataset] table, and each subset carries what its [[datasets]] entry and its own
table set, so our subset -> [dataset] fallback gives the same values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafuse.errors import ConfigError
from lorafuse.train.kohya_common import KohyaImport, Row, parse_resolution, read_toml
from lorafuse.train.kohya_keys import INACTIVE, Rule

# settings of a [[datasets]] entry (and of [general]) that our subsets carry as bucket settings
DATASET_LEVEL = (
    "resolution",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "bucket_no_upscale",
)
# settings a subset may set (and a [[datasets]] entry or [general] for all its subsets)
SUBSET_LEVEL = (
    "caption_extension",
    "keep_tokens",
    "shuffle_caption",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
    "flip_aug",
    "random_crop",
    "alpha_mask",
    "num_repeats",  # kohya's config_README: [general], [[datasets]] or a subset
)
SUBSET_ONLY = ("image_dir", "class_tokens", "is_reg")
NOTED = {
    "cache_info": "image sizes are read once per run",
    "resize_interpolation": "images resize with LANCZOS",
}
REFUSED = {
    "color_aug": "color augmentation is not implemented",
    "face_crop_aug_range": "face-crop augmentation is not implemented",
    "keep_tokens_separator": "a caption feature lorafuse does not implement",
    "secondary_separator": "a caption feature lorafuse does not implement",
    "enable_wildcard": "a caption feature lorafuse does not implement",
    "caption_prefix": "a caption feature lorafuse does not implement",
    "caption_suffix": "a caption feature lorafuse does not implement",
    "token_warmup_min": "a caption feature lorafuse does not implement",
    "token_warmup_step": "a caption feature lorafuse does not implement",
    "caption_dropout_every_n_epochs": "caption dropout per epoch is not implemented",
    "caption_separator": "tags are split on ','",
    "metadata_file": "fine-tuning metadata subsets are not supported; use image_dir with captions beside the images",
    "network_multiplier": "a LoRA multiplier other than 1 during training is not supported",
    "custom_attributes": "not supported",
    "skip_image_resolution": "skipping small source images per dataset is not implemented",
}


def summary() -> str:
    """The dataset_config counts README states: keys of [general], [[datasets]] and [[datasets.subsets]]."""
    mapped = {*DATASET_LEVEL, *SUBSET_LEVEL, *SUBSET_ONLY, "conditioning_data_dir", "batch_size", "validation_split"}
    mapped |= {"validation_seed"}
    return (
        f"{len(mapped) + len(NOTED) + len(REFUSED)} dataset_config keys: {len(mapped)} mapped, {len(NOTED)} "
        f"accepted with no effect here, {len(REFUSED)} refused unless off"
    )


_OFF = {"token_warmup_min": 1, "caption_separator": ",", "network_multiplier": 1}


def _value(key: str, value: Any) -> Any:
    if key == "resolution":
        return parse_resolution(value)
    return value


def _handled(imp: KohyaImport, where: str, key: str, value: Any) -> bool:
    """Notes and refusals shared by every level; True when `key` was one of them."""
    if key in NOTED:
        imp.note(f"{where}{key}", value, NOTED[key])
    elif key in REFUSED:
        if value in INACTIVE or value == _OFF.get(key):
            imp.note(f"{where}{key}", value, "off")
        else:
            imp.refuse(f"{where}{key}", value, REFUSED[key])
    else:
        return False
    return True


def _read(path: Path) -> dict[str, Any]:
    """kohya reads a dataset config as JSON when its name ends in .json, else as TOML."""
    if path.suffix.lower() != ".json":
        return read_toml(path)
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable JSON dataset config: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a dataset config is an object with general / datasets, got {type(data).__name__}")
    return data


def _general(imp: KohyaImport, general: dict[str, Any], batch_sizes: set) -> dict[str, Any]:
    """[general] into [dataset]; returns what every subset inherits from it (num_repeats, which [dataset] lacks)."""
    inherited: dict[str, Any] = {}
    for key, value in general.items():
        where = "general."
        if _handled(imp, where, key, value):
            continue
        if key == "num_repeats":  # no [dataset] field: every subset carries it (unless it sets its own)
            inherited = {key: value}
            imp.rows.append(Row(f"{where}{key}", value, "mapped", f"dataset.subsets[].num_repeats = {value!r}"))
        elif key in DATASET_LEVEL or key in SUBSET_LEVEL:
            imp.put(f"dataset.{key}", _value(key, value), f"{where}{key}", value)
        elif key == "batch_size":
            batch_sizes.add(value)
        elif key in ("validation_split", "validation_seed"):
            imp.put(f"dataset.{key}", value, f"{where}{key}", value)
        else:
            imp.refuse(f"{where}{key}", value, "unknown [general] key")
    return inherited


def convert_dataset_config(imp: KohyaImport, path: Path, flat: dict[str, Any]) -> None:
    if not path.is_file():
        imp.refuse("dataset_config", str(path), "file not found")
        return
    cfg = _read(path)
    for key in cfg:
        if key not in ("general", "datasets"):
            imp.refuse(
                f"dataset_config:{key}", cfg[key], "unknown table (kohya has [general] and [[datasets]])"
            )
    general = cfg.get("general", {})
    has_ext = "caption_extension" in general or "caption_extension" in flat
    batch_sizes, splits = set(), set()
    general_repeats = _general(imp, general, batch_sizes)
    subsets: list[dict[str, Any]] = []
    datasets = cfg.get("datasets", [])
    if not datasets:
        imp.refuse("dataset_config", str(path), "no [[datasets]] with [[datasets.subsets]]")
    # A setting every [[datasets]] entry gives the same value goes to [dataset] (samples use its resolution).
    shared = {
        key: datasets[0][key]
        for key in DATASET_LEVEL
        if datasets and all(key in d and d[key] == datasets[0][key] for d in datasets)
    }
    for key, value in shared.items():
        imp.put(
            f"dataset.{key}", _value(key, value), f"datasets[].{key}", value, "the same in every [[datasets]]"
        )
    if "resolution" not in shared and "resolution" not in general and datasets and "resolution" in datasets[0]:
        # datasets of different sizes: each subset keeps its own; [dataset] (samples, checks) takes the first's
        imp.data.setdefault("dataset", {})["resolution"] = _value("resolution", datasets[0]["resolution"])
    for d, dataset in enumerate(datasets):
        inherited = dict(general_repeats)
        for key, value in dataset.items():
            where = f"datasets[{d}]."
            if key == "subsets" or key in shared or _handled(imp, where, key, value):
                continue
            if key in DATASET_LEVEL or key in SUBSET_LEVEL:
                inherited[key] = _value(key, value)
                has_ext |= key == "caption_extension"
            elif key == "batch_size":
                batch_sizes.add(value)
            elif key == "validation_split":
                splits.add(value)
            else:
                imp.refuse(f"{where}{key}", value, "unknown [[datasets]] key")
        for s, subset in enumerate(dataset.get("subsets", [])):
            where = f"datasets[{d}].subsets[{s}]."
            masked = not Rule("map").is_inactive(flat.get("masked_loss"))
            subsets.append(_subset(imp, where, subset, inherited, masked))
            has_ext |= "caption_extension" in subset
    if subsets:
        imp.put("dataset.subsets", subsets, "dataset_config", str(path), f"{len(subsets)} subsets")
    if len(batch_sizes) > 1:
        imp.refuse("batch_size", sorted(batch_sizes), "lorafuse trains with one batch size for every dataset")
    elif batch_sizes:
        imp.put("training.train_batch_size", batch_sizes.pop(), "dataset_config batch_size", None)
    if len(splits) > 1:
        imp.refuse("validation_split", sorted(splits), "one validation_split for every dataset")
    elif splits:
        imp.put("dataset.validation_split", splits.pop(), "datasets[].validation_split", None)
    if not has_ext:
        imp.put(
            "dataset.caption_extension",
            ".caption",
            "caption_extension",
            None,
            "kohya's default",
            action="default",
        )


def _subset(
    imp: KohyaImport, where: str, subset: dict[str, Any], inherited: dict[str, Any], masked_loss: bool
) -> dict[str, Any]:
    out = dict(inherited)
    for key, value in subset.items():
        if _handled(imp, where, key, value):
            continue
        if key == "conditioning_data_dir":
            # kohya reads this folder as loss masks only with masked_loss; otherwise it is ControlNet data
            if masked_loss:
                out["mask_dir"] = Path(value).as_posix()
            elif value not in INACTIVE:
                imp.refuse(
                    f"{where}{key}",
                    value,
                    "mask images are read only with masked_loss = true (ControlNet datasets are not supported)",
                )
        elif key in SUBSET_ONLY or key in SUBSET_LEVEL or key in DATASET_LEVEL:
            out[key] = _value(key, value)
        else:
            imp.refuse(f"{where}{key}", value, "unknown subset key")
    if "image_dir" not in out:
        raise ConfigError(f"{where}image_dir: missing (kohya requires it for DreamBooth-style subsets)")
    out["image_dir"] = Path(out["image_dir"]).as_posix()
    for key, value in sorted(out.items()):
        imp.rows.append(_row(where, key, value))
    return out


def _row(where: str, ours: str, value: Any):
    kohya = "conditioning_data_dir" if ours == "mask_dir" else ours
    return Row(f"{where}{kohya}", value, "mapped", f"dataset.subsets[].{ours} = {value!r}")
