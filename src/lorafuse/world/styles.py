"""Renderings ("styles") of the world: each changes texture and palette, never the drawn geometry.

A style is a function of a `Canvas` (flat colours, object mask, soft edge map, background, local rng) that
returns an RGB float image. Styles run at the supersampled resolution so textures anti-alias on downsampling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class Canvas:
    colour: np.ndarray  # (H, W, 3) flat part colours, background included
    obj: np.ndarray  # (H, W) bool, True on the object
    edge: np.ndarray  # (H, W) float in [0, 1], 1 on part boundaries
    background: np.ndarray  # (H, W, 3) background alone
    rng: np.random.Generator

    @property
    def shape(self) -> tuple[int, int]:
        return self.obj.shape  # type: ignore[return-value]

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.shape
        return np.mgrid[0:h, 0:w].astype(np.float32)


def _lum(c: np.ndarray) -> np.ndarray:
    return c @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _mix(a, b, t):
    return a * (1 - t) + b * t


def _thick_edge(cv: Canvas, px: int) -> np.ndarray:
    return ndimage.binary_dilation(cv.edge > 0.3, iterations=px).astype(np.float32)


def flat(cv: Canvas) -> np.ndarray:
    return cv.colour


def outlined(cv: Canvas) -> np.ndarray:
    sat = np.clip(_mix(_lum(cv.colour)[..., None], cv.colour, 1.35), 0, 1)
    return _mix(sat, np.full(3, 0.06, np.float32), _thick_edge(cv, 2)[..., None])


def hatched(cv: Canvas) -> np.ndarray:
    y, x = cv.coords()
    paper = np.array([0.97, 0.96, 0.92], np.float32)
    dark = 1 - _lum(cv.colour)
    spacing = 7.0
    phase = ((x + y) % spacing) / spacing
    line = (phase < 0.25 + 0.45 * dark).astype(np.float32)  # darker parts get thicker lines
    cross = ((((x - y) % spacing) / spacing) < 0.3 * dark).astype(np.float32)
    ink = np.clip(cv.colour * 0.75, 0, 1)
    out = _mix(paper, ink, np.maximum(line, cross)[..., None] * cv.obj[..., None])
    return _mix(out, np.full(3, 0.15, np.float32), _thick_edge(cv, 1)[..., None])


def dotted(cv: Canvas) -> np.ndarray:
    y, x = cv.coords()
    paper = np.array([0.98, 0.97, 0.95], np.float32)
    cell = 8.0
    dx = (x % cell) - cell / 2
    dy = (y % cell) - cell / 2
    r = np.hypot(dx, dy) / (cell / 2)
    radius = 0.45 + 0.55 * (1 - _lum(cv.colour))
    dots = (r < radius).astype(np.float32)[..., None]
    bg = _mix(paper, cv.background, 0.25)
    fg = _mix(paper, cv.colour, dots)
    return np.where(cv.obj[..., None], fg, bg)


def striped(cv: Canvas) -> np.ndarray:
    y, _ = cv.coords()
    band = ((y // 5) % 2).astype(np.float32)[..., None]
    light = _mix(cv.colour, np.ones(3, np.float32), 0.55)
    fg = _mix(cv.colour, light, band)
    bgband = ((y // 10) % 2).astype(np.float32)[..., None]
    bg = _mix(cv.background, cv.background * 0.9, bgband)
    return np.where(cv.obj[..., None], fg, bg)


def pixel(cv: Canvas) -> np.ndarray:
    h, w = cv.shape
    block = h // 16
    small = cv.colour.reshape(h // block, block, w // block, block, 3).mean(axis=(1, 3))
    small = np.round(np.clip(small * 1.15 - 0.05, 0, 1) * 3) / 3  # 4 levels per channel, punchier
    return np.repeat(np.repeat(small, block, 0), block, 1)


def watercolor(cv: Canvas) -> np.ndarray:
    paper = np.array([0.98, 0.96, 0.9], np.float32)
    soft = ndimage.gaussian_filter(cv.colour, sigma=(2.5, 2.5, 0))
    wash = _mix(soft, paper, 0.35)
    # pigment pools at the rim of each wash
    rim = ndimage.gaussian_filter(cv.edge, 1.5)[..., None]
    wash = np.clip(wash - 0.35 * rim * (1 - wash), 0, 1)
    grain = ndimage.gaussian_filter(cv.rng.standard_normal(cv.shape).astype(np.float32), 3)[..., None]
    return np.clip(wash + 0.25 * grain, 0, 1)


def neon(cv: Canvas) -> np.ndarray:
    night = np.array([0.04, 0.03, 0.1], np.float32)
    sat = np.clip(_mix(_lum(cv.colour)[..., None], cv.colour, 2.0), 0, 1)
    core = _thick_edge(cv, 1)
    glow = ndimage.gaussian_filter(core, 3)[..., None]
    colour_glow = ndimage.gaussian_filter(sat * core[..., None], sigma=(3, 3, 0))
    fill = np.where(cv.obj[..., None], sat * 0.22, night)
    out = fill + 2.2 * colour_glow + 0.3 * glow
    return np.clip(_mix(out, np.clip(sat + 0.5, 0, 1), core[..., None] * 0.9), 0, 1)


def ink(cv: Canvas) -> np.ndarray:
    paper = np.array([0.95, 0.95, 0.93], np.float32)
    levels = np.round((1 - _lum(cv.colour)) * 2) / 2  # three greys
    fill = _mix(paper, np.full(3, 0.1, np.float32), (levels * 0.55)[..., None])
    out = np.where(cv.obj[..., None], fill, paper)
    return _mix(out, np.full(3, 0.02, np.float32), _thick_edge(cv, 1)[..., None])


def pastel(cv: Canvas) -> np.ndarray:
    soft = _mix(cv.colour, np.array([1.0, 0.96, 0.97], np.float32), 0.5)
    soft = _mix(_lum(soft)[..., None], soft, 0.7)
    return ndimage.gaussian_filter(soft, sigma=(1.0, 1.0, 0))


def crayon(cv: Canvas) -> np.ndarray:
    paper = np.array([0.96, 0.92, 0.82], np.float32)
    # wax streaks: noise smeared along one diagonal
    noise = cv.rng.random(cv.shape).astype(np.float32)
    streak = ndimage.uniform_filter(noise, size=(1, 9))
    streak = ndimage.rotate(streak, 30, reshape=False, mode="wrap")
    coverage = (streak > 0.42).astype(np.float32)[..., None]
    wobbly = ndimage.gaussian_filter(cv.obj.astype(np.float32), 1.2)[..., None]
    fg = _mix(paper, np.clip(cv.colour * 1.1, 0, 1), coverage * np.clip(wobbly * 1.4, 0, 1))
    return np.clip(fg, 0, 1)


def blueprint(cv: Canvas) -> np.ndarray:
    y, x = cv.coords()
    blue = np.array([0.1, 0.25, 0.58], np.float32)
    grid = (((x % 16) < 1) | ((y % 16) < 1)).astype(np.float32)[..., None]
    out = _mix(blue, np.array([0.45, 0.6, 0.85], np.float32), grid * 0.6)
    tint = _mix(blue, np.array([0.6, 0.75, 0.95], np.float32), (0.2 + 0.5 * _lum(cv.colour))[..., None])
    out = np.where(cv.obj[..., None], tint, out)
    return _mix(out, np.full(3, 0.97, np.float32), _thick_edge(cv, 1)[..., None])


def mosaic(cv: Canvas) -> np.ndarray:
    h, w = cv.shape
    tile = 8
    small = cv.colour.reshape(h // tile, tile, w // tile, tile, 3).mean(axis=(1, 3))
    jitter = 1 + 0.06 * cv.rng.standard_normal(small.shape[:2] + (1,)).astype(np.float32)
    big = np.repeat(np.repeat(np.clip(small * jitter, 0, 1), tile, 0), tile, 1)
    y, x = cv.coords()
    grout = (((x % tile) < 1) | ((y % tile) < 1)).astype(np.float32)[..., None]
    return _mix(big, np.array([0.85, 0.83, 0.78], np.float32), grout)


StyleFn = Callable[[Canvas], np.ndarray]

# name -> (function, caption phrase). Phrases are what prompts say: "in {phrase} style".
STYLES: dict[str, tuple[StyleFn, str]] = {
    "flat": (flat, "flat color"),
    "outlined": (outlined, "bold outline cartoon"),
    "hatched": (hatched, "hatched ink"),
    "dotted": (dotted, "halftone dot"),
    "striped": (striped, "striped"),
    "pixel": (pixel, "pixel art"),
    "watercolor": (watercolor, "watercolor"),
    "neon": (neon, "neon glow"),
    "ink": (ink, "monochrome ink"),
    "pastel": (pastel, "soft pastel"),
    "crayon": (crayon, "wax crayon"),
    "blueprint": (blueprint, "blueprint"),
    "mosaic": (mosaic, "tile mosaic"),
}
