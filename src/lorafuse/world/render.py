"""Render an individual in a style: pose -> part masks -> flat colours -> style -> downsample.

Geometry is drawn at `SUPERSAMPLE` x the output size and averaged down, so edges and textures anti-alias.
Pose (scale, rotation, position) and background are nuisance factors drawn from the sample's own rng.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lorafuse.world.catalog import Individual, check_style, individual
from lorafuse.world.classes import CLASSES
from lorafuse.world.styles import STYLES, Canvas

SUPERSAMPLE = 2
BACKGROUND_TINTS = ((0.93, 0.93, 0.9), (0.86, 0.92, 0.97), (0.95, 0.9, 0.85), (0.88, 0.95, 0.88), (0.94, 0.9, 0.95))


@dataclass(frozen=True)
class Pose:
    scale: float = 0.85
    angle: float = 0.0  # radians
    dx: float = 0.0
    dy: float = 0.0
    scene: int = 0  # 0 plain, 1 horizon, 2 vignette
    tint: int = 0

    @staticmethod
    def random(rng: np.random.Generator) -> Pose:
        return Pose(
            scale=float(rng.uniform(0.75, 1.0)),
            angle=float(rng.uniform(-0.2, 0.2)),
            dx=float(rng.uniform(-0.1, 0.1)),
            dy=float(rng.uniform(-0.08, 0.08)),
            scene=int(rng.integers(3)),
            tint=int(rng.integers(len(BACKGROUND_TINTS))),
        )


def _local_grid(n: int, pose: Pose) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in [-1, 1]^2 mapped into the object's frame (inverse of scale-rotate-translate)."""
    c = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1
    y, x = np.meshgrid(c, c, indexing="ij")
    x, y = x - pose.dx, y - pose.dy
    ca, sa = np.cos(-pose.angle), np.sin(-pose.angle)
    xr, yr = ca * x - sa * y, sa * x + ca * y
    return xr / pose.scale, yr / pose.scale


def _background(n: int, pose: Pose) -> np.ndarray:
    tint = np.array(BACKGROUND_TINTS[pose.tint], np.float32)
    bg = np.broadcast_to(tint, (n, n, 3)).copy()
    yy = np.linspace(-1, 1, n, dtype=np.float32)[:, None]
    if pose.scene == 1:  # horizon: a darker ground band
        bg[(yy > 0.55).repeat(n, 1)] *= 0.82
    elif pose.scene == 2:  # vignette
        xx = np.linspace(-1, 1, n, dtype=np.float32)[None, :]
        bg *= (1 - 0.18 * np.clip(xx**2 + yy**2, 0, 1))[..., None]
    return bg


def render(ind: Individual, style: str, rng: np.random.Generator | int = 0, size: int = 64,
           pose: Pose | None = None) -> np.ndarray:
    """Return an (size, size, 3) uint8 image of `ind` in `style`. Deterministic given the rng seed."""
    check_style(style)
    if size % 16:
        raise ValueError(f"size must be a multiple of 16, got {size}")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    pose = pose or Pose.random(rng)
    n = size * SUPERSAMPLE
    grid = _local_grid(n, pose)
    parts = CLASSES[ind.cls][1](grid, ind.traits)

    labels = np.zeros((n, n), np.int16)
    colour = _background(n, pose)
    background = colour.copy()
    for k, (mask, role) in enumerate(parts, start=1):
        labels[mask] = k
        colour[mask] = ind.palette[role]
    obj = labels > 0
    # a boundary wherever the label changes between 4-neighbours
    edge = np.zeros((n, n), bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    edge_f = ndimage.binary_dilation(edge, iterations=SUPERSAMPLE - 1).astype(np.float32) if SUPERSAMPLE > 1 else edge.astype(np.float32)

    canvas = Canvas(colour=colour, obj=obj, edge=edge_f, background=background, rng=rng)
    out = STYLES[style][0](canvas)
    out = out.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_named(name: str, style: str, seed: int = 0, size: int = 64) -> np.ndarray:
    cls, _, idx = name.rpartition("_")
    return render(individual(cls, int(idx)), style, seed, size)
