"""Scores of generated images: oracle metrics on the built-in world, the docs/algorithms.md §7.6 aggregates, confidence intervals.

Notation (docs/algorithms.md §7.6): c = content similarity (mean cosine of an image's embedding to the content
references), s = style similarity (to the style references). "single" is the image made with only that
factor's LoRA (same base, seed, steps, weight), "fused" the image made with both.

    cross_influence = ½[(c_single − c_fused)/c_single + (s_single − s_fused)/s_single]   (lower is better)
    ci_product      = c_fused · s_fused   (the CRAFT paper's wording: "the product of CLIP-I similarities
                      between the generated image and both reference images"; its table values cannot be
                      recomputed from its other columns, so this is reported for comparability only)
    arithmetic mean (c + s)/2 and harmonic mean 2cs/(c + s): the harmonic one drops when one side is lost.

Everything is per image (arrays of shape (N,)); aggregate with `confidence_interval`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorafuse.errors import UserInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def mean_cosine(embeddings: torch.Tensor, references: torch.Tensor) -> np.ndarray:
    """(N, D), (M, D) unit vectors -> (N,) mean cosine of each row to all references."""
    if len(references) == 0:
        raise UserInputError("no reference embeddings to compare against")
    return (embeddings.double() @ references.double().T).mean(1).numpy()


def cross_influence(c_single, c_fused, s_single, s_fused) -> np.ndarray:
    """½[(c_single − c_fused)/c_single + (s_single − s_fused)/s_single], elementwise (docs/algorithms.md §7.6).

    0 = fusing loses nothing on either side; 0.5 = one side lost entirely. Undefined (nan) where a single-LoRA
    similarity is not positive: a LoRA that does not reach its own references gives no baseline to drop from.
    """
    cs, cf, ss, sf = (np.asarray(v, dtype=np.float64) for v in (c_single, c_fused, s_single, s_fused))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 0.5 * ((cs - cf) / cs + (ss - sf) / ss)
    return np.where((cs > 0) & (ss > 0), out, np.nan)


def ci_product(c_fused, s_fused) -> np.ndarray:
    """The product form c_fused · s_fused (see the module docstring for why it is kept)."""
    return np.asarray(c_fused, dtype=np.float64) * np.asarray(s_fused, dtype=np.float64)


def arithmetic_mean(c, s) -> np.ndarray:
    return (np.asarray(c, dtype=np.float64) + np.asarray(s, dtype=np.float64)) / 2


def harmonic_mean(c, s) -> np.ndarray:
    """2cs/(c + s); 0 where either score is <= 0 (a cosine can be negative, where the harmonic mean means
    nothing, and "lost one side" is what it should say)."""
    c, s = np.asarray(c, dtype=np.float64), np.asarray(s, dtype=np.float64)
    ok = (c > 0) & (s > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, 2 * c * s / np.where(ok, c + s, 1.0), 0.0)


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def confidence_interval(values: Sequence[float] | np.ndarray, level: float = 0.95, method: str = "t",
                        n_boot: int = 10_000, seed: int = 0) -> Interval:  # fmt: skip
    """Mean and a `level` confidence interval; nan values are dropped (e.g. undefined cross-influence).

    method "t": mean ± t_{(1+level)/2, n−1} · sd/√n (Student t; right for a few seeds of a roughly normal score).
    method "bootstrap": percentile interval of `n_boot` resampled means (`scipy.stats.bootstrap`; no normality
    assumption, needs more values to mean anything). One value gives a zero-width interval at that value; none
    gives nan.
    """
    from scipy import stats

    if not 0 < level < 1:
        raise UserInputError(f"confidence level must be in (0, 1), got {level}")
    if method not in ("t", "bootstrap"):
        raise UserInputError(f"unknown confidence-interval method {method!r}; expected 't' or 'bootstrap'")
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1 or np.all(x == x[0]):  # scipy gives nan for a zero spread; the interval is that one value
        return Interval(mean, mean, mean, n)
    if method == "t":
        lo, hi = stats.t.interval(level, n - 1, loc=mean, scale=stats.sem(x))
    else:
        res = stats.bootstrap((x,), np.mean, confidence_level=level, n_resamples=n_boot, method="percentile",
                              random_state=np.random.default_rng(seed))  # fmt: skip
        lo, hi = res.confidence_interval
    return Interval(mean, float(lo), float(hi), n)


def proportion_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> Interval:
    """Wilson score interval of a rate (values 0/1, e.g. right_individual): unlike mean ± t·se it stays inside
    [0, 1] and is not zero-width when every value agrees (0 of 4 right is not proof of a 0 % rate)."""
    from scipy.stats import binomtest

    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    k = int(round(x.sum()))
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return Interval(float(x.mean()), float(ci.low), float(ci.high), n)


# --- reference images ------------------------------------------------------------------------------------------


def load_reference_folder(folder: str | Path, role: str) -> np.ndarray:
    """All images of `folder` as (M, H, W, 3) uint8. Errors (missing, empty, mixed sizes) name the folder."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"{role} references: {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserInputError(f"{role} references: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    sizes = {im.shape[:2] for im in images}
    if len(sizes) > 1:
        # Stacking would fail later with a numpy error; resizing silently would change what is compared.
        listing = ", ".join(
            f"{p.name} {im.shape[1]}x{im.shape[0]}" for p, im in zip(files, images, strict=True)
        )
        raise UserInputError(
            f"{role} references in {folder} have different sizes ({listing[:300]}); resize them to one size"
        )
    return np.stack(images)


def world_references(individual: str | None = None, style: str | None = None, count: int = 8,
                     seed: int = 0) -> np.ndarray:  # fmt: skip
    """Clean renders as `world.dataset` writes them: the individual across the seen styles, or the style on
    random seen individuals. (count, 64, 64, 3) uint8."""
    from lorafuse.world.catalog import SEEN_STYLES, all_individuals, check_style, parse_individual
    from lorafuse.world.render import render

    if (individual is None) == (style is None):
        raise ValueError("give exactly one of individual or style")
    rng = np.random.default_rng([seed, 999])
    out = []
    if individual is not None:
        ind = parse_individual(individual)
        for k in range(count):
            out.append(render(ind, SEEN_STYLES[k % len(SEEN_STYLES)], rng))
    else:
        check_style(style)
        seen = all_individuals(held_out=False)
        for _ in range(count):
            out.append(render(seen[int(rng.integers(len(seen)))], style, rng))
    return np.stack(out)


# --- the oracle ------------------------------------------------------------------------------------------------


class OracleScorer:
    """Per-image oracle scores; the references are embedded once, here, not for every batch of images.

    individual / style: the world names the images should show ('teapot_08', 'ink'); they give the "right
    individual / class / style" accuracies (0 or 1 per image) and, when no reference images are given, the
    references (`world_references`). Keys of the result depend on what is given: oracle_content, oracle_style,
    right_individual, right_class, right_style, and always pred_individual, pred_class, pred_style.
    """

    def __init__(self, oracle, *, individual: str | None = None, style: str | None = None,
                 content_references=None, style_references=None):  # fmt: skip
        from lorafuse.world.catalog import check_style, parse_individual

        self.oracle = oracle
        self.individual = parse_individual(individual) if individual is not None else None
        self.style = check_style(style) if style is not None else None
        if content_references is None and individual is not None:
            content_references = world_references(individual=individual)
        if style_references is None and style is not None:
            style_references = world_references(style=style)
        self._content_ref = None if content_references is None else oracle.judge(content_references).content
        self._style_ref = None if style_references is None else oracle.judge(style_references).style

    def __call__(self, images) -> dict[str, np.ndarray]:
        verdict = self.oracle.judge(images)
        out: dict[str, np.ndarray] = {
            "pred_individual": np.array(verdict.individual),
            "pred_class": np.array(verdict.cls),
            "pred_style": np.array(verdict.style_name),
        }
        if self._content_ref is not None:
            out["oracle_content"] = mean_cosine(verdict.content, self._content_ref)
        if self._style_ref is not None:
            out["oracle_style"] = mean_cosine(verdict.style, self._style_ref)
        if self.individual is not None:
            out["right_individual"] = (out["pred_individual"] == self.individual.name).astype(np.float64)
            out["right_class"] = (out["pred_class"] == self.individual.cls).astype(np.float64)
        if self.style is not None:
            out["right_style"] = (out["pred_style"] == self.style).astype(np.float64)
        return out


def oracle_metrics(images, oracle, **references) -> dict[str, np.ndarray]:
    """`OracleScorer(oracle, **references)(images)` for a one-off call."""
    return OracleScorer(oracle, **references)(images)
