"""Loss masks (kohya's `masked_loss` / `alpha_mask`): which pixels of a training image teach the LoRA.

A mask holds one weight per pixel in [0, 1] (1 trains, 0 is ignored, 0.5 counts half). It comes from
- the image's own alpha channel (`alpha_mask = true`): opaque pixels train, transparent ones do not; an image with
  no alpha channel is fully opaque (as kohya), which the scan reports;
- or a same-named image in a mask folder (a subset's `mask_dir`, kohya's `conditioning_data_dir` with
  `masked_loss`): its red channel, as kohya reads it (a grayscale mask is the same in every channel).

The mask goes through the image's own geometry: EXIF orientation, the bucket resize, the (random or centre) crop
and the flip, so each mask pixel stays on its image pixel; with `cache_latents` it is cached beside the latents.

The loss is kohya's `apply_masked_loss`: the elementwise loss (B, C, h, w) is multiplied by the mask resized to
the latent size with area interpolation (each latent cell gets the mean weight of the 8x8 pixels it encodes), then
averaged over (C, h, w) as without a mask. It is not renormalised by the mask's mean: an image half masked out
weighs half as much in the batch, as in kohya.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lorafuse.errors import UserInputError
from lorafuse.train.buckets import resize_and_crop
from lorafuse.train.dataset_folders import IMAGE_EXTENSIONS
from lorafuse.train.images import ALPHA_MODES, to_rgb, upright

if TYPE_CHECKING:
    from lorafuse.train.cache import LatentCache
    from lorafuse.train.data import DatasetIndex, ImageItem

log = logging.getLogger(__name__)

MaskSource = Path | Literal["alpha"] | None
# a mask image may differ in size from its image (masks drawn at another resolution), not in shape
_ASPECT_TOLERANCE = 0.02


def apply_mask(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Elementwise loss (B, C, h, w) weighted by the pixel mask (B, 1, H, W), area-resized to (h, w)."""
    if loss.dim() != 4:
        raise UserInputError(
            f"loss masks need an image-shaped prediction (B, C, h, w); this model predicts {tuple(loss.shape)}"
        )
    weight = F.interpolate(mask.to(loss.device, loss.dtype), size=loss.shape[2:], mode="area")
    return loss * weight


def find_mask(image: Path, mask_dir: Path) -> Path:
    """The mask of `image` in `mask_dir`: the file with the same name, any image extension."""
    if not mask_dir.is_dir():
        raise UserInputError(f"{mask_dir}: mask_dir does not exist or is not a folder")
    found = sorted(p for p in mask_dir.glob(f"{image.stem}.*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not found:
        raise UserInputError(
            f"{image}: no mask image named {image.stem}.* in {mask_dir}; every image of a subset with mask_dir "
            "needs its mask (white trains, black is ignored)"
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise UserInputError(f"{image}: several masks in {mask_dir} ({names}); keep one")
    return found[0]


def mask_source(image: Path, alpha_mask: bool, mask_dir: Path | None) -> MaskSource:
    """Where the mask of `image` comes from; the mask folder wins over the alpha channel, as in kohya."""
    if mask_dir is not None:
        return find_mask(image, mask_dir)
    return "alpha" if alpha_mask else None


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)


def file_has_alpha(path: Path) -> bool:
    with Image.open(path) as img:  # the header only: no pixels decoded
        return has_alpha(img)


def load_mask(item: ImageItem) -> Image.Image:
    """The mask of `item` as an 8-bit gray image at the image's upright size (item.size)."""
    if item.mask == "alpha":
        with Image.open(item.path) as img:
            img.load()
            img = upright(img)
            if not has_alpha(img):
                return Image.new("L", img.size, 255)
            return img.convert("RGBA").getchannel("A")
    with Image.open(item.mask) as img:
        img.load()
        mask = to_rgb(upright(img)).getchannel("R")
    if mask.size != item.size:
        (mw, mh), (w, h) = mask.size, item.size
        if abs(mw / mh - w / h) > _ASPECT_TOLERANCE * (w / h):
            raise UserInputError(
                f"{item.mask}: the mask is {mw}x{mh}, its image {item.path.name} is {w}x{h}; a mask must have "
                "its image's shape (it may differ in size)"
            )
        mask = mask.resize(item.size, Image.Resampling.BILINEAR)
    return mask


def mask_pixels(item: ImageItem, flip: bool, offset: tuple[int, int]) -> torch.Tensor:
    """(H, W) uint8 mask at the item's bucket size, cropped at `offset` and flipped as its image."""
    mask = resize_and_crop(load_mask(item), item.assignment, offset)
    if flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy())


def sample_mask(
    index: DatasetIndex,
    item_idx: int,
    flip: bool,
    offset: tuple[int, int],
    cache: LatentCache | None = None,
) -> torch.Tensor:
    """(1, H, W) float weights in [0, 1] of one sample; all ones for an image without a mask (a batch may mix
    subsets with and without masks, as in kohya)."""
    item = index.items[item_idx]
    if item.mask is None:
        width, height = item.assignment.bucket
        return torch.ones(1, height, width)
    pixels = cache.get_mask(item_idx, flip) if cache is not None else mask_pixels(item, flip, offset)
    return (pixels.float() / 255.0).unsqueeze(0)


def report_orphan_masks(mask_dir: Path | None, images: list[Path]) -> None:
    """Mask images that match no image of the subset are named, not silently passed over (a typo'd name)."""
    if mask_dir is None or not mask_dir.is_dir():
        return
    stems = {p.stem for p in images}
    orphans = sorted(
        p.name for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.stem not in stems
    )
    if orphans:
        log.warning(
            "%s: %d mask image(s) match no image of the subset and are not used (e.g. %s)",
            mask_dir,
            len(orphans),
            orphans[0],
        )


def report_unmasked(folder: Path, images: list[Path]) -> None:
    """alpha_mask on images without an alpha channel trains them whole: say so, once per folder."""
    if images:
        log.warning(
            "%s: alpha_mask is set, but %d image(s) have no alpha channel and train whole (e.g. %s)",
            folder,
            len(images),
            images[0].name,
        )
