"""Images: float -> uint8 conversion, labelled grids (the pictures people look at), atomic PNG writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lorafuse.utils.atomic import atomic_path


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats (any shape) -> uint8, rounded to nearest as diffusers' `numpy_to_pil` does. Hand-written:
    numpy_to_pil returns PIL images and does not clip, so a value a little outside [0, 1] would wrap around."""
    arr = np.asarray(images)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    # in the images' own float type: float32 and float64 round a few pixels in a million differently
    return (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def labelled_grid(images: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str], col_labels: Sequence[str],
                  scale: int = 2, pad: int = 2, title: str | None = None) -> Image.Image:
    """images[r][c] is an (H, W, 3) uint8 array; upscaled by `scale` (nearest) so 64 px samples stay visible.
    Hand-written: `diffusers.utils.make_image_grid` has no labels, title or padding."""
    rows, cols = len(images), len(images[0])
    h, w = images[0][0].shape[:2]
    ch, cw = h * scale, w * scale
    font = _font(11)
    left, top = _margins(row_labels, title)
    canvas = Image.new("RGB", grid_size(rows, cols, (w, h), row_labels, scale, pad, title), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black", font=_font(13))
    for c, label in enumerate(col_labels):
        draw.text((left + c * (cw + pad) + 2, top - 14), label[: max(4, cw // 6)], fill="black", font=font)
    for r in range(rows):
        draw.text((4, top + r * (ch + pad) + ch // 2 - 6), row_labels[r], fill="black", font=font)
        for c in range(cols):
            tile = Image.fromarray(images[r][c]).resize((cw, ch), Image.NEAREST)
            canvas.paste(tile, (left + c * (cw + pad), top + r * (ch + pad)))
    return canvas


def _margins(row_labels: Sequence[str], title: str | None) -> tuple[int, int]:
    """(left, top): room for the row labels and for the column labels (and the title)."""
    return max(8 + 6 * max((len(s) for s in row_labels), default=0), 40), 34 if title else 18


def grid_size(rows: int, cols: int, tile: tuple[int, int], row_labels: Sequence[str], scale: int = 2, pad: int = 2,
              title: str | None = None) -> tuple[int, int]:  # fmt: skip
    """(width, height) of the `labelled_grid` of rows x cols tiles of `tile` (width, height) pixels: known before
    any image is made, for the disk-space estimates of the writers that draw grids."""
    left, top = _margins(row_labels, title)
    return left + cols * (tile[0] * scale + pad), top + rows * (tile[1] * scale + pad)


def save_image(img: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
