"""Aspect-ratio bucketing with the semantics of kohya sd-scripts' `BucketManager`.

Buckets are (width, height) pairs, multiples of `steps`, with each side in [min_reso, max_reso] and
area <= resolution² (or width x height for a (width, height) resolution, kohya's "512,768"). An image goes to the bucket whose aspect ratio is closest to its own, is resized to
cover the bucket (one side equal, the other larger), then cropped. With `no_upscale`, images smaller than
resolution² keep their size (rounded down to `steps`) and larger ones shrink to area resolution².
Without bucketing every image is covered-and-cropped to (resolution, resolution), or to (width, height).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

Size = tuple[int, int]  # (width, height), PIL's order


def make_bucket_resolutions(
    resolution: int | Size, min_size: int = 256, max_size: int = 1024, steps: int = 64
) -> list[Size]:
    """kohya's `make_bucket_resolutions`: the square bucket plus, for each width, the tallest height that fits
    in the area of `resolution` (an int r is r x r; a (width, height) gives width * height)."""
    width, height = _wh(resolution)
    max_area = width * height
    side = int(math.sqrt(max_area) // steps) * steps
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, steps):
        height = min(max_size, (max_area // width) // steps * steps)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def _wh(resolution: int | Size) -> Size:
    return (resolution, resolution) if isinstance(resolution, int) else (resolution[0], resolution[1])


@dataclass(frozen=True)
class BucketAssignment:
    bucket: Size  # the training crop
    resized: Size  # the image is resized to this before cropping; both sides >= the bucket's


@dataclass(frozen=True)
class BucketSpec:
    resolution: int | Size  # r (r x r) or (width, height)
    enable: bool = False
    min_reso: int = 256
    max_reso: int = 1024
    steps: int = 64
    no_upscale: bool = False


class BucketManager:
    def __init__(self, spec: BucketSpec):
        self.spec = spec
        self.size = _wh(spec.resolution)
        self.max_area = self.size[0] * self.size[1]
        self.resos: list[Size] = []
        if spec.enable and not spec.no_upscale:
            self.resos = make_bucket_resolutions(spec.resolution, spec.min_reso, spec.max_reso, spec.steps)
        self._ratios = np.array([w / h for w, h in self.resos])

    def assign(self, size: Size) -> BucketAssignment:
        """Bucket and resize target of an image of `size`; ValueError if it cannot fill even one step."""
        width, height = size
        if not self.spec.enable:
            return BucketAssignment(self.size, _cover((width, height), self.size))
        if self.spec.no_upscale:
            return self._assign_no_upscale(width, height)
        ratio = width / height
        bucket = self.resos[int(np.abs(self._ratios - ratio).argmin())]
        return BucketAssignment(bucket, _cover((width, height), bucket))

    def _assign_no_upscale(self, width: int, height: int) -> BucketAssignment:
        ratio = width / height
        resized = (width, height)
        if width * height > self.max_area:
            # Shrink to the maximum area, then round the side whose rounding keeps the aspect ratio better.
            r_width = math.sqrt(self.max_area * ratio)
            r_height = self.max_area / r_width
            w_rounded = self._round(r_width)
            ar_w = w_rounded / self._round(w_rounded / ratio)
            h_rounded = self._round(r_height)
            ar_h = self._round(h_rounded * ratio) / h_rounded
            if abs(ar_w - ratio) < abs(ar_h - ratio):
                resized = (w_rounded, int(w_rounded / ratio + 0.5))
            else:
                resized = (int(h_rounded * ratio + 0.5), h_rounded)
        step = self.spec.steps
        bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
        if min(bucket) == 0:
            raise ValueError(f"{width}x{height} is smaller than bucket_reso_steps = {step} on one side")
        return BucketAssignment(bucket, resized)

    def _round(self, x: float) -> int:
        # kohya's round_to_steps (round, then down to a multiple of steps), but never 0: kohya divides by it.
        n = int(x + 0.5)
        return max(n - n % self.spec.steps, self.spec.steps)


def _cover(size: Size, bucket: Size) -> Size:
    """Resize keeping the aspect ratio so that the image covers `bucket`; kohya rounds each side half-up."""
    width, height = size
    if width / height > bucket[0] / bucket[1]:  # wider than the bucket: match heights
        scale = bucket[1] / height
    else:
        scale = bucket[0] / width
    return max(int(width * scale + 0.5), bucket[0]), max(int(height * scale + 0.5), bucket[1])


def crop_offset(resized: Size, bucket: Size, rng: np.random.Generator | None) -> tuple[int, int]:
    """(left, top) of the crop: centered when `rng` is None, uniform over valid offsets otherwise."""
    dx, dy = resized[0] - bucket[0], resized[1] - bucket[1]
    if rng is None:
        return dx // 2, dy // 2
    return int(rng.integers(dx + 1)), int(rng.integers(dy + 1))


def resize_and_crop(image: Image.Image, assignment: BucketAssignment, offset: tuple[int, int]) -> Image.Image:
    if image.size != assignment.resized:
        # LANCZOS anti-aliases when shrinking (as kohya's cv2 INTER_AREA) and stays sharp when enlarging.
        image = image.resize(assignment.resized, Image.Resampling.LANCZOS)
    left, top = offset
    return image.crop((left, top, left + assignment.bucket[0], top + assignment.bucket[1]))
