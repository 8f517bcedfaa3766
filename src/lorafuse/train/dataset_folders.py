"""Building a training dataset in kohya's folder layout: the API behind `lorafuse dataset ...` and the web UI's
Dataset tab.

A dataset is a folder of subset folders named `<repeats>_<trigger> <class>` (e.g. `10_sks dog`), each holding
images with a caption beside each (`000.png` + `000.txt`); `lorafuse train --train_data_dir DATASET` reads it
(`lorafuse.train.scan.scan_dataset`). This module only reads and writes files (PIL, no torch), so the UI
process can call it without loading a model library.

    add_images(dataset, images, trigger=, cls=, repeats=)   copy checked images into a subset folder
    caption_rows(dataset) / write_captions(rows)            the caption table, read and written back
    set_subset(subset, trigger=, cls=, repeats=)            rename a subset folder (its trigger/class/repeats)
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lorafuse.errors import UserInputError
from lorafuse.utils.atomic import atomic_path, atomic_write_text, check_output

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # what training reads
ADD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # what `add_images` accepts (decoded, not judged by the name)
FOLDER_PATTERN = "<repeats>_<trigger> <class>"
FOLDER_RE = re.compile(r"^([0-9]+)_(\S.*)$")
# An epoch lists every image `repeats` times; real datasets use 1 to a few hundred. Far above that is a typo,
# and a number like 99999999999999999999 would otherwise build a list of that length and hang the run.
MAX_REPEATS = 10_000
_WORD = re.compile(r"^\w[\w .-]*$")


def parse_subset_folder(folder: Path) -> tuple[int, str]:
    """'10_sks dog' -> (10, 'sks dog'); anything else is an error naming the folder and the pattern."""
    m = FOLDER_RE.match(folder.name)
    if m is None or int(m.group(1)) < 1:
        raise UserInputError(
            f"{folder}: folder name must be '{FOLDER_PATTERN}' with repeats >= 1 (e.g. '10_sks dog'), got '{folder.name}'"
        )
    check_repeats(int(m.group(1)), str(folder))
    return int(m.group(1)), m.group(2).strip()


def check_repeats(repeats: int, where: str) -> None:
    if repeats > MAX_REPEATS:
        raise UserInputError(
            f"{where}: {repeats} repeats is more than {MAX_REPEATS}, which no dataset needs (an epoch shows each image "
            "that many times); use a smaller number and set max_train_epochs or max_train_steps for a longer run"
        )


def subset_name(repeats: int, trigger: str, cls: str) -> str:
    """kohya's folder name: (10, 'sks', 'dog') -> '10_sks dog'. Trigger and class become the caption's subject."""
    if int(repeats) < 1:
        raise UserInputError(f"repeats must be >= 1, got {repeats}")
    check_repeats(int(repeats), "repeats")
    for label, value in (("trigger", trigger), ("class", cls)):
        if not _WORD.match(value.strip()):
            raise UserInputError(f"{label} {value!r}: use letters, digits, spaces, '.', '-' or '_'")
    return f"{int(repeats)}_{trigger.strip()} {cls.strip()}"


def check_image(path: str | os.PathLike, *, max_bytes: int | None = None) -> str:
    """The format of an image file (PNG, JPEG, ...) decoded from its bytes, or one error naming the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such image file")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise UserInputError(f"{path.name}: {size:,} bytes is over the limit of {max_bytes:,} bytes")
    try:
        with Image.open(path) as im:
            fmt = im.format
            im.verify()  # reads the whole file: a truncated or disguised file fails here
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserInputError(f"{path.name}: not an image ({type(e).__name__}); give PNG, JPEG, WEBP or BMP") from None
    if fmt not in ADD_FORMATS:
        raise UserInputError(f"{path.name}: image type {fmt} is not accepted; give PNG, JPEG, WEBP or BMP")
    return fmt


@dataclass(frozen=True)
class Added:
    folder: Path  # the subset folder
    images: list[Path]  # the copies, in the order given


def add_images(dataset: str | os.PathLike, images: Sequence[str | os.PathLike], *, trigger: str, cls: str,
               repeats: int, caption: str | None = None, max_bytes: int | None = None) -> Added:  # fmt: skip
    """Copy `images` into DATASET/<repeats>_<trigger> <class>/, each with a caption file.

    A folder among `images` stands for the images directly in it (by name). Every image is checked (real image
    type, size) before anything is written. A copy keeps its file name (made unique with -1, -2, ... if taken).
    Its caption: `caption` if given, else the `.txt` beside the source image, else 'a photo of a <trigger> <class>'."""
    folder = Path(dataset) / subset_name(repeats, trigger, cls)
    sources = [q for p in map(Path, images) for q in (_images_in(p) if p.is_dir() else [p])]
    if not sources:
        raise UserInputError("no images given")
    formats = [check_image(p, max_bytes=max_bytes) for p in sources]
    check_output(dataset, kind="folder", what="dataset folder", estimate=sum(p.stat().st_size for p in sources))
    default = f"a photo of a {trigger.strip()} {cls.strip()}"
    taken = {p.stem for p in folder.iterdir()} if folder.is_dir() else set()
    written = []
    for src, fmt in zip(sources, formats, strict=True):
        stem = _free_stem(src.stem, taken)
        taken.add(stem)
        target = folder / (stem + {"JPEG": ".jpg"}.get(fmt, "." + fmt.lower()))
        with atomic_path(target) as tmp:
            shutil.copyfile(src, tmp)
        beside = src.with_suffix(".txt")
        text = caption if caption is not None else (beside.read_text().strip() if beside.is_file() else default)
        atomic_write_text(target.with_suffix(".txt"), text.strip() + "\n")
        written.append(target)
    return Added(folder, written)


def _images_in(folder: Path) -> list[Path]:
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not found:
        raise UserInputError(f"{folder}: no images in this folder ({', '.join(IMAGE_EXTENSIONS)})")
    return found


def _free_stem(stem: str, taken: set[str]) -> str:
    stem = re.sub(r"[^\w.-]", "_", stem) or "image"
    k, name = 0, stem
    while name in taken:
        k += 1
        name = f"{stem}-{k}"
    return name


def subset_folders(dataset: str | os.PathLike) -> list[Path]:
    """The subset folders of a dataset (names of the kohya pattern), sorted; other folders are not data."""
    root = Path(dataset)
    if not root.is_dir():
        raise UserInputError(f"{root}: no such dataset folder")
    found = [(p, FOLDER_RE.match(p.name)) for p in sorted(root.iterdir()) if p.is_dir()]
    return [p for p, m in found if m and int(m.group(1)) > 0]


def caption_rows(dataset: str | os.PathLike) -> list[tuple[Path, str]]:
    """(image, caption) for every image of every subset folder; '' where an image has no caption file."""
    rows = []
    for folder in subset_folders(dataset):
        for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
            txt = image.with_suffix(".txt")
            rows.append((image, txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""))
    return rows


def write_captions(rows: Iterable[tuple[str | os.PathLike, str]]) -> int:
    """Write each caption beside its image (IMAGE.txt). Every image is checked first, so a bad row writes
    nothing; a caption is one line (kohya reads the first line). An image given twice gets its last caption."""
    targets = {}
    for image, caption in rows:
        path = Path(image)
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise UserInputError(f"{image}: not an image ({', '.join(IMAGE_EXTENSIONS)})")
        if not path.is_file():
            raise UserInputError(f"{image}: no such image")
        parse_subset_folder(path.parent)
        targets[path.with_suffix(".txt")] = " ".join(str(caption).split())
    for txt, caption in targets.items():
        atomic_write_text(txt, caption + "\n")
    return len(targets)


def set_subset(subset: str | os.PathLike, *, trigger: str | None = None, cls: str | None = None,
               repeats: int | None = None) -> Path:  # fmt: skip
    """Rename a subset folder to carry a new trigger word, class and/or repeats; returns the new folder.
    The class is the folder name's last word ('10_sks toy dog' has trigger 'sks toy', class 'dog')."""
    folder = Path(subset)
    if not folder.is_dir():
        raise UserInputError(f"{folder}: no such subset folder")
    old_repeats, words = parse_subset_folder(folder)
    old_trigger, _, old_cls = words.rpartition(" ")
    if not old_trigger:  # '10_sks': a trigger word and no class
        old_trigger, old_cls = old_cls, ""
    if not (cls or old_cls):
        raise UserInputError(f"{folder}: its name has no class word ('{FOLDER_PATTERN}'); give the class")
    new = folder.with_name(subset_name(old_repeats if repeats is None else repeats, trigger or old_trigger,
                                       cls or old_cls))  # fmt: skip
    if new != folder:
        if new.exists():
            raise UserInputError(f"{new}: exists already; merge the two folders by hand or choose other names")
        folder.rename(new)  # one rename: atomic on the same file system
    return new
