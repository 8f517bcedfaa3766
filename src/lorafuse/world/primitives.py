"""Vectorised 2-D primitives: each returns a boolean mask over a grid of object-local coordinates.

Coordinates are object-local: x right, y down, the object roughly inside [-0.9, 0.9]^2. The renderer maps
every pixel into this frame once per image (inverse pose), so each primitive is a few array operations.
Written by hand because no rasterizer in our dependency set works on per-pixel local coordinates.
"""

from __future__ import annotations

import numpy as np

Grid = tuple[np.ndarray, np.ndarray]


def ellipse(g: Grid, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    x, y = g
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def ring(g: Grid, cx: float, cy: float, r_out: float, r_in: float) -> np.ndarray:
    x, y = g
    d2 = (x - cx) ** 2 + (y - cy) ** 2
    return (d2 <= r_out**2) & (d2 >= r_in**2)


def rect(g: Grid, cx: float, cy: float, w: float, h: float, round_frac: float = 0.0) -> np.ndarray:
    """Axis-aligned box of half-sizes (w/2, h/2); `round_frac` rounds corners by that fraction of min side."""
    x, y = g
    r = round_frac * min(w, h) / 2
    qx = np.abs(x - cx) - (w / 2 - r)
    qy = np.abs(y - cy) - (h / 2 - r)
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    inside = np.minimum(np.maximum(qx, qy), 0)
    return outside + inside - r <= 0


def triangle(g: Grid, p1, p2, p3) -> np.ndarray:
    x, y = g

    def side(a, b):
        return (x - b[0]) * (a[1] - b[1]) - (a[0] - b[0]) * (y - b[1])

    d1, d2, d3 = side(p1, p2), side(p2, p3), side(p3, p1)
    has_neg = (d1 < 0) | (d2 < 0) | (d3 < 0)
    has_pos = (d1 > 0) | (d2 > 0) | (d3 > 0)
    return ~(has_neg & has_pos)


def capsule(g: Grid, a, b, radius: float) -> np.ndarray:
    """Thick segment from a to b (round ends)."""
    x, y = g
    ax, ay = a
    bx, by = b
    dx, dy = bx - ax, by - ay
    denom = dx * dx + dy * dy + 1e-12
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / denom, 0.0, 1.0)
    return (x - (ax + t * dx)) ** 2 + (y - (ay + t * dy)) ** 2 <= radius**2


def diamond(g: Grid, cx: float, cy: float, r: float) -> np.ndarray:
    x, y = g
    return np.abs(x - cx) + np.abs(y - cy) <= r


def star(g: Grid, cx: float, cy: float, r: float, points: int = 5) -> np.ndarray:
    x, y = g
    ang = np.arctan2(y - cy, x - cx)
    rad = np.hypot(x - cx, y - cy)
    # radius oscillates between r and r/2 around the circle
    limit = r * (0.55 + 0.45 * np.cos(points * ang) ** 2)
    return rad <= limit


def trapezoid(g: Grid, cx: float, cy: float, w_top: float, w_bottom: float, h: float) -> np.ndarray:
    x, y = g
    t = np.clip((y - (cy - h / 2)) / h, 0.0, 1.0)
    half = (w_top + (w_bottom - w_top) * t) / 2
    return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= h / 2)
