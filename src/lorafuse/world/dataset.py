"""Personalisation datasets from the world, in kohya's folder layout.

`write_subject_dataset` renders one (usually held-out) individual in a few poses and seen styles;
`write_style_dataset` renders one style on a few seen individuals. Folder: OUT/<repeats>_<trigger> <class>/
with `NNN.png` + `NNN.txt` captions, as kohya's `train_network.py` reads it. A `references/` folder holds
clean renders the oracle compares generations against.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from lorafuse.errors import UserInputError
from lorafuse.utils.atomic import atomic_folder, atomic_path, atomic_write_text, check_output, png_bytes
from lorafuse.utils.kohya_names import REFERENCES_FOLDER, WORLD_DATASET_INFO, subset_name
from lorafuse.world.catalog import (
    CLASS_NAMES,
    SEEN_STYLES,
    Individual,
    all_individuals,
    caption,
    check_style,
    parse_individual,
    style_phrase,
)
from lorafuse.world.render import render

DEFAULT_TRIGGER = "sks"


def _save_png(img: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


REFERENCES = 8  # clean renders in references/
SIDE = 64  # pixels: the world base's image size
# a caption ("a photo of a sks teapot, in ... style") and world_dataset.json are a few hundred bytes
CAPTION, _INFO = 1 << 10, 4 << 10
# Personalisation needs a handful of images (the web UI offers up to 1000). 100k is far past any use yet stays a
# few GB of 64 px PNGs and a list of captions that fits in memory; a typo like 10**12 would hang building that list.
MAX_IMAGES = 100_000


def estimate_bytes(n: int) -> int:
    """An upper bound of a dataset of `n` images: their PNGs and captions, the references, the info file."""
    return (n + REFERENCES) * png_bytes(SIDE, SIDE) + n * CAPTION + _INFO


def check_count(n: int, most: int = MAX_IMAGES, why: str = "a personalisation dataset needs a handful") -> int:
    """`n` if it is a number of images this writer makes, else one error naming --n, the limit and `why`."""
    if n < 1:
        raise UserInputError(f"--n must be at least 1, got {n}")
    if n > most:
        raise UserInputError(f"--n {n}: give at most {most} images ({why})")
    return n


def _new_output(out: str | Path, n: int) -> Path:
    """The output folder, once `n` and the folder are checked (it must be new or empty)."""
    check_count(n)
    out = check_output(out, kind="folder", what="dataset folder", estimate=estimate_bytes(n))
    if out.is_dir() and any(out.iterdir()):
        raise UserInputError(f"{out}: output folder exists and is not empty; choose a new folder")
    return out


def _write_images(folder: Path, items: list[tuple[Individual, str, str]], seed: int) -> None:
    """(individual, style, caption) k -> k.png, rendered with the stream [seed, k], and k.txt."""
    for k, (ind, style, text) in enumerate(items):
        _save_png(render(ind, style, np.random.default_rng([seed, k]), size=SIDE), folder / f"{k:03d}.png")
        atomic_write_text(folder / f"{k:03d}.txt", text)


def write_subject_dataset(name: str, out: str | Path, n: int = 5, repeats: int = 10, trigger: str = DEFAULT_TRIGGER,
                          styles: tuple[str, ...] = ("flat",), seed: int = 0) -> Path:
    """n images of individual `name` (e.g. 'teapot_08'); captions 'a photo of a sks teapot, in ... style'."""
    ind = parse_individual(name)
    for s in styles:
        check_style(s)
    name = subset_name(repeats, trigger, ind.cls)  # one path component, repeats in range, before any output
    trigger = trigger.strip()  # as in the folder name, so captions and folder agree
    out = _new_output(out, n)
    subject, per_image = f"{trigger} {ind.cls}", [styles[k % len(styles)] for k in range(n)]
    with atomic_folder(out) as tmp:  # the dataset appears whole or not at all
        _write_images(tmp / name, [(ind, st, caption(ind, st, k, subject=subject)) for k, st in enumerate(per_image)],
                      seed)  # fmt: skip
        _write_references(tmp, ind=ind, style=None, seed=seed)
        _write_info(tmp, {"kind": "subject", "individual": ind.name, "class": ind.cls, "trigger": trigger,
                          "styles": list(styles), "n": n, "repeats": repeats, "seed": seed})
    return out / name


def write_style_dataset(style: str, out: str | Path, n: int = 1, repeats: int = 20, trigger: str = DEFAULT_TRIGGER,
                        seed: int = 0) -> Path:
    """n images in `style` of different seen individuals; captions 'a photo of a red mug, in sks style'."""
    check_style(style)
    seen = all_individuals(held_out=False)
    # each image shows a different seen individual (sampled without replacement), so there are at most len(seen)
    check_count(n, len(seen), f"a style dataset shows each of the {len(seen)} seen individuals at most once")
    name = subset_name(repeats, trigger, "style")
    trigger = trigger.strip()  # as in the folder name, so captions and folder agree
    out = _new_output(out, n)
    rng = np.random.default_rng(seed)
    picks = [seen[int(i)] for i in rng.choice(len(seen), size=n, replace=False)]
    with atomic_folder(out) as tmp:  # the dataset appears whole or not at all
        _write_images(tmp / name, [(ind, style, f"a photo of a {ind.colour_names[0]} {ind.cls}, in {trigger} style")
                                   for ind in picks], seed)  # fmt: skip
        _write_references(tmp, ind=None, style=style, seed=seed)
        _write_info(tmp, {"kind": "style", "style": style, "phrase": style_phrase(style), "trigger": trigger,
                          "individuals": [p.name for p in picks], "n": n, "repeats": repeats, "seed": seed})
    return out / name


def _write_references(out: Path, ind: Individual | None, style: str | None, seed: int, count: int = REFERENCES) -> None:
    """Clean renders for the oracle: the subject across seen styles, or the style across classes."""
    ref = out / REFERENCES_FOLDER
    rng = np.random.default_rng([seed, 999])
    for k in range(count):
        if ind is not None:
            img = render(ind, SEEN_STYLES[k % len(SEEN_STYLES)], rng, size=SIDE)
        else:
            other = all_individuals(held_out=False)[int(rng.integers(len(CLASS_NAMES) * 8))]
            img = render(other, style, rng, size=SIDE)
        _save_png(img, ref / f"{k:03d}.png")


def _write_info(out: Path, info: dict) -> None:
    atomic_write_text(out / WORLD_DATASET_INFO, json.dumps(info, indent=1))
