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

import contextlib
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lorafuse.errors import UserInputError
from lorafuse.utils.atomic import atomic_path, atomic_write_text, check_output
from lorafuse.utils.kohya_names import (  # the naming rule, shared with the world's datasets; kept importable here
    FOLDER_PATTERN,
    FOLDER_RE,
    parse_subset_folder,
    subset_name,
)
from lorafuse.utils.kohya_names import (  # re-exported: the train config's subset check reads it from here
    MAX_REPEATS as MAX_REPEATS,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # what training reads
ADD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # what `add_images` accepts (decoded, not judged by the name)
MAX_PIXELS = 8192 * 8192  # larger than any training resolution needs; a "decompression bomb" claims far more


def check_image(path: str | os.PathLike, *, max_bytes: int | None = None, inside: Path | None = None) -> str:
    """The format of an image file (PNG, JPEG, ...) decoded from its bytes, or one error naming the file."""
    with _open_image(Path(path), max_bytes, inside) as im:
        return im.format


def _open_confined(path: Path, inside: Path | None):
    """`path` opened for reading; with `inside`, refused unless the file actually opened lies in that folder (its
    /proc/self/fd link names it after every symlink was followed, so no check-then-open window)."""
    fh = open(path, "rb")  # noqa: SIM115 - the caller closes it
    if inside is not None:
        link = f"/proc/self/fd/{fh.fileno()}"
        real = Path(os.path.realpath(link if os.path.exists(link) else path))
        if Path(inside).resolve() not in real.parents:
            fh.close()
            raise UserInputError(f"{path.name}: a symlink leads outside {inside} (to {real}); refused")
    return fh


@contextlib.contextmanager
def _open_image(path: Path, max_bytes: int | None, inside: Path | None):
    """The image at `path`, checked: its size, its real type (decoded, not judged by the name), its pixel count
    (before decoding: a small file can claim billions of pixels), and the whole file read (a truncated or
    disguised file fails here). With `inside`, the file actually opened must lie in that folder: checked on the
    open file itself, so a symlink (also one swapped in after the caller's checks) cannot lead the read out."""
    from PIL import Image, UnidentifiedImageError

    try:
        fh = _open_confined(path, inside)
    except FileNotFoundError:
        raise UserInputError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise UserInputError(f"{path}: is a folder, not an image file") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise UserInputError(f"{path.name}: {size:,} bytes is over the limit of {max_bytes:,} bytes")
        too_big = f"{path.name}: more pixels than the limit of {MAX_PIXELS:,} (8192 x 8192); scale it down first"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(fh)
            if im.width * im.height > MAX_PIXELS:
                raise UserInputError(f"{too_big} (it has {im.width} x {im.height})")
            if im.format not in ADD_FORMATS:
                raise UserInputError(f"{path.name}: image type {im.format} is not accepted; give PNG, JPEG, WEBP or BMP")
            im.verify()  # the file's structure and checksums (a cut-off PNG whose pixels still decode fails here)
            fh.seek(0)
            im = Image.open(fh)  # verify() leaves the image unusable: open it again to decode
            im.load()  # every pixel decoded: a truncated or corrupt file fails here, not in training
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UserInputError(too_big) from None
        except UnidentifiedImageError:
            raise UserInputError(f"{path.name}: not an image; give PNG, JPEG, WEBP or BMP") from None
        except (OSError, SyntaxError, ValueError) as e:  # it opened as an image, then failed to decode
            raise UserInputError(f"{path.name}: not an image that decodes: damaged or cut short ({e}); save it again") from None
        yield im


def _write_image(src: Path, target: Path, max_bytes: int | None, inside: Path | None) -> None:
    """A fresh encoding of the decoded pixels, never the uploaded bytes: whatever rode along in the file (an
    appended zip, a script in a comment or metadata chunk: a polyglot) is gone. JPEG stays JPEG with its own
    quantisation tables; the rest become PNG (lossless). The EXIF rotation is applied, as training applies it."""
    from PIL import ImageOps

    with _open_image(src, max_bytes, inside) as im:
        rotated = im.getexif().get(0x0112, 1) not in (0, 1)  # EXIF orientation
        with atomic_path(target) as tmp:
            if target.suffix == ".jpg" and not rotated:  # "keep" needs the decoded JPEG itself
                im.save(tmp, format="JPEG", quality="keep", subsampling="keep")
            elif target.suffix == ".jpg":
                ImageOps.exif_transpose(im).save(tmp, format="JPEG", quality=95)
            else:
                out = ImageOps.exif_transpose(im) if rotated else im
                if out.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I"):
                    out = out.convert("RGBA" if "A" in out.getbands() else "RGB")
                out.save(tmp, format="PNG")


@dataclass(frozen=True)
class Added:
    folder: Path  # the subset folder
    images: list[Path]  # the copies, in the order given


def add_images(dataset: str | os.PathLike, images: Sequence[str | os.PathLike], *, trigger: str, cls: str,
               repeats: int, caption: str | None = None, max_bytes: int | None = None,
               inside: str | os.PathLike | None = None) -> Added:  # fmt: skip
    """Write `images` into DATASET/<repeats>_<trigger> <class>/, each with a caption file.

    A folder among `images` stands for the images directly in it (by name); with `inside` (the web UI's
    workspace), every image read through such a folder must really lie inside that folder tree (`_open_image`).
    Every image is checked (size, real image type, pixel count, a full decode) before anything is written; each
    is written as a fresh encoding of its pixels (`_write_image`), keeping its file name (made unique with -1,
    -2, ... if taken). Its caption: `caption` if given, else the `.txt` beside the source image, else
    'a photo of a <trigger> <class>'."""
    folder = Path(dataset) / subset_name(repeats, trigger, cls)
    confine = Path(inside) if inside is not None else None
    sources = [(q, confine if p.is_dir() else None) for p in map(Path, images)
               for q in (_images_in(p) if p.is_dir() else [p])]  # fmt: skip
    if not sources:
        raise UserInputError("no images given")
    formats = [check_image(p, max_bytes=max_bytes, inside=within) for p, within in sources]
    check_output(dataset, kind="folder", what="dataset folder", estimate=sum(p.stat().st_size for p, _ in sources))
    default = f"a photo of a {trigger.strip()} {cls.strip()}"
    taken = {p.stem for p in folder.iterdir()} if folder.is_dir() else set()
    written = []
    for (src, within), fmt in zip(sources, formats, strict=True):
        stem = _free_stem(src.stem, taken)
        taken.add(stem)
        target = folder / (stem + (".jpg" if fmt == "JPEG" else ".png"))
        _write_image(src, target, max_bytes, within)
        text = caption if caption is not None else (_caption_beside(src, within) or default)
        atomic_write_text(target.with_suffix(".txt"), text.strip() + "\n")
        written.append(target)
    return Added(folder, written)


def _caption_beside(image: Path, inside: Path | None) -> str:
    """The caption file beside a source image, if any (read only if it too lies inside `inside`)."""
    try:
        with _open_confined(image.with_suffix(".txt"), inside) as fh:
            return fh.read().decode("utf-8", "replace").strip()
    except (FileNotFoundError, IsADirectoryError):
        return ""


def _images_in(folder: Path) -> list[Path]:
    # dot-names: an atomic write's temporary file (gone a moment later) or a hidden file, not a sample
    found = sorted(p for p in folder.iterdir()
                   if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())  # fmt: skip
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
    found = [(p, FOLDER_RE.match(p.name)) for p in sorted(root.iterdir()) if p.is_dir()]  # dot-names never match
    return [p for p, m in found if m and int(m.group(1)) > 0]


def caption_rows(dataset: str | os.PathLike) -> list[tuple[Path, str]]:
    """(image, caption) for every image of every subset folder; '' where an image has no caption file."""
    rows = []
    for folder in subset_folders(dataset):
        for image in sorted(p for p in folder.iterdir()
                            if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):  # fmt: skip
            try:  # a caption is replaced atomically, but a user may delete one while this reads
                caption = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                caption = ""
            rows.append((image, caption))
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
