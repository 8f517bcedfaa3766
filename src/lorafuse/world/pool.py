"""Pools of rendered images with their true factors, for training the oracle and the base model.

A pool is a plain (N, H, W, 3) uint8 array plus factor indices; it can be cached as .npz so background jobs
(oracle, VAE, UNet) share one rendering pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lorafuse.utils.atomic import atomic_path
from lorafuse.world.catalog import STYLE_NAMES, Individual, all_individuals
from lorafuse.world.render import render


@dataclass
class Pool:
    images: np.ndarray  # (N, H, W, 3) uint8
    individual: np.ndarray  # (N,) index into all_individuals()
    style: np.ndarray  # (N,) index into STYLE_NAMES
    caption_template: np.ndarray  # (N,) caption template index

    def __len__(self) -> int:
        return len(self.images)


def render_pool(n: int, individuals: list[Individual], styles: list[str], seed: int, size: int = 64,
                progress: bool = True) -> Pool:
    everyone = all_individuals()
    ind_ids = np.array([everyone.index(x) for x in individuals])
    style_ids = np.array([STYLE_NAMES.index(s) for s in styles])
    rng = np.random.default_rng(seed)
    # balanced: cycle through every (individual, style) pair, shuffled
    pairs = np.stack(np.meshgrid(ind_ids, style_ids, indexing="ij"), -1).reshape(-1, 2)
    order = np.concatenate([rng.permutation(len(pairs)) for _ in range(-(-n // len(pairs)))])[:n]
    chosen = pairs[order]
    images = np.empty((n, size, size, 3), np.uint8)
    for k in tqdm(range(n), desc="render", disable=not progress, mininterval=2):
        images[k] = render(everyone[chosen[k, 0]], STYLE_NAMES[chosen[k, 1]], np.random.default_rng([seed, k]), size)
    return Pool(images, chosen[:, 0], chosen[:, 1], rng.integers(0, 4, n))


def save_pool(pool: Pool, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=pool.images, individual=pool.individual, style=pool.style,
                     caption_template=pool.caption_template)


def pool_file_bytes(n: int, size: int = 64) -> int:
    """An upper bound of a `save_pool` file of n images: the uint8 images, three int64 labels per image, and
    the .npz (zip) framing and .npy headers of its four arrays."""
    return n * (size * size * 3 + 3 * 8) + 4 * 1024


def cached_pool_bytes(path: str | Path, n: int, size: int = 64) -> int:
    """What `cached_pool(path, n, ...)` writes: nothing when the file exists (reused, or rewritten in place of
    a file that was there), else the new pool file."""
    return 0 if Path(path).exists() else pool_file_bytes(n, size)


def load_pool(path: str | Path) -> Pool:
    with np.load(path) as z:
        return Pool(z["images"], z["individual"], z["style"], z["caption_template"])


def cached_pool(path: str | Path, n: int, individuals: list[Individual], styles: list[str], seed: int,
                size: int = 64) -> Pool:
    path = Path(path)
    if path.exists():
        pool = load_pool(path)
        if len(pool) == n and pool.images.shape[1] == size:
            return pool
    pool = render_pool(n, individuals, styles, seed, size)
    save_pool(pool, path)
    return pool
