"""Dataset folders in the workspace, in kohya's layout (`<repeats>_<trigger> <class>/` with image + .txt caption
pairs), which `lorafuse train` reads (`lorafuse.train.data.scan_dataset`)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from lorafuse.errors import UserInputError
from lorafuse.ui.workspace import IMAGE_SUFFIXES as IMAGE_EXTENSIONS
from lorafuse.ui.workspace import Workspace, check_upload
from lorafuse.utils.atomic import atomic_path, atomic_write_text

_WORD = re.compile(r"^[\w][\w .-]*$")


def subset_name(repeats: int, trigger: str, cls: str) -> str:
    """kohya's folder name: '10_sks teapot'. The trigger and class become the caption's subject."""
    if int(repeats) < 1:
        raise UserInputError(f"repeats must be >= 1, got {repeats}")
    for label, value in (("trigger", trigger), ("class", cls)):
        if not _WORD.match(value.strip()):
            raise UserInputError(f"{label} {value!r}: use letters, digits, spaces, '.', '-' or '_'")
    return f"{int(repeats)}_{trigger.strip()} {cls.strip()}"


def write_uploads(ws: Workspace, name: str, files: list[str], *, trigger: str, cls: str, repeats: int,
                  max_bytes: int) -> Path:  # fmt: skip
    """Check every upload (size, real image type) first, then copy them into datasets/NAME/<subset>/ with a
    caption 'a photo of a <trigger> <class>' each (edit them in the caption table)."""
    if not files:
        raise UserInputError("no images uploaded")
    formats = [check_upload(f, max_bytes=max_bytes) for f in files]
    root = ws.resolve(f"datasets/{name}")
    folder = root / subset_name(repeats, trigger, cls)
    start = len(list(folder.glob("*"))) // 2 if folder.exists() else 0
    for k, (src, fmt) in enumerate(zip(files, formats, strict=True)):
        stem = f"{start + k:03d}"
        suffix = {"JPEG": ".jpg"}.get(fmt, "." + fmt.lower())
        with atomic_path(folder / f"{stem}{suffix}") as tmp:
            shutil.copyfile(src, tmp)
        atomic_write_text(folder / f"{stem}.txt", f"a photo of a {trigger.strip()} {cls.strip()}")
    return folder


def subsets(ws: Workspace, dataset: str) -> list[Path]:
    # imported here: lorafuse.train.data pulls in torch, which the page's start-up need not wait for
    from lorafuse.train.data import parse_subset_folder

    root = ws.resolve(dataset, must_exist=True)
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            parse_subset_folder(folder)
        except UserInputError:
            continue
        found.append(folder)
    return found


def caption_rows(ws: Workspace, dataset: str) -> list[list[str]]:
    """[image (workspace-relative), caption] for every image of every subset folder."""
    rows = []
    for folder in subsets(ws, dataset):
        for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
            txt = image.with_suffix(".txt")
            rows.append([ws.relative(image), txt.read_text().strip() if txt.exists() else ""])
    return rows


def save_captions(ws: Workspace, rows: list[list[str]]) -> int:
    """Write each row's caption beside its image (paths checked against the workspace first)."""
    targets = []
    for image, caption in rows:
        path = ws.resolve(str(image), must_exist=True)
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise UserInputError(f"{image}: not an image of a dataset")
        targets.append((path.with_suffix(".txt"), str(caption).strip()))
    for txt, caption in targets:
        atomic_write_text(txt, caption + "\n")
    return len(targets)
