"""Decoding training images as they are meant to be seen: upright (EXIF), 8-bit RGB from any PIL mode."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: cameras store portrait photos sideways plus an EXIF Orientation tag,
    which viewers apply and a plain decode does not. Applied before bucketing, so sizes and buckets are upright."""
    return ImageOps.exif_transpose(img) or img


def load_rgb(path: Path, notes: list[str] | None = None) -> Image.Image:
    """Decode fully (a truncated file fails here, not hours into training), turn upright, convert to 8-bit RGB
    by mode (16-bit and float gray rescaled, alpha flattened onto white). PIL's own warnings (damaged EXIF data,
    a very large image) go to `notes`, for the dataset scan to name the file once, instead of to stderr with
    PIL's source line on every load."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Image.open(path) as img:
            img.load()  # the first frame of an animated file; the scan warns about the others
            out = to_rgb(upright(img))
    if notes is not None:
        notes += sorted({" ".join(str(w.message).split()) for w in caught})
    return out


# 16-bit and float images hold their own ranges: PIL's convert("RGB") clips them at 255 (all white)
_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: high-depth gray rescaled, transparency flattened onto white."""
    if img.mode in _HIGH_DEPTH:
        return _high_depth_gray(img)
    if img.mode in ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        # Plain convert("RGB") keeps whatever colour hides under transparent pixels, often black.
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    try:
        return img.convert("RGB")
    except ValueError as e:  # e.g. LAB or HSV, which PIL cannot convert directly
        raise ValueError(f"images of mode {img.mode} are not supported; save it as 8-bit RGB") from e


def _high_depth_gray(img: Image.Image) -> Image.Image:
    a = np.asarray(img, dtype=np.float64)
    peak = float(a.max()) if a.size else 0.0
    if img.mode.startswith("I;16"):
        full = 65535.0
    elif img.mode == "F" and peak <= 1.0:
        full = 1.0  # float images are stored in [0, 1] by the tools that write them (tifffile, OpenCV)
    else:
        # mode I (and F beyond 1) comes from 16-bit PNG/TIFF data, or 8-bit data widened by an editor
        full = 65535.0 if peak > 255 else 255.0
    gray = np.clip(np.rint(a * (255.0 / full)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def image_frames(path: Path) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load_rgb has reported them
        with Image.open(path) as img:
            return int(getattr(img, "n_frames", 1))
