"""Training data for the CRAFT expert encoder: the best (λ_c, λ_s) of a λ grid, per prompt (docs/algorithms.md §7.4).

    for each prompt p = (concept ID, content span, style span) and each (λ_c, λ_s) in the grid:
        score[p, (λ_c, λ_s)] = score_fn([p, ...], λ_c, λ_s)[p]        e.g. harmonic mean of oracle content and
                                                                      style similarity, averaged over seeds
    example(p) = ExpertExample(p, argmax over the grid of score[p, ·])

The paper does not say what its expert encoder learns from; this is our answer (see `expert.py`). Nothing here
knows about images: `score_fn(prompts, λ_c, λ_s) -> (len(prompts),)` is any scorer, so the selection is tested on
a fake one and `eval.expert_world.world_score_fn` is the built-in world's (CRAFT fusion scored by the oracle).

Ties: scores within `tie_tolerance` of the best count as equal and the one nearest (1, 1), the markers' default,
wins, so the encoder only learns to move away from the default where the grid measured a difference.

Soft labels (`temperature` τ > 0): the argmax of 9-25 scores that each carry seed noise jumps between corners of
the grid from one noise draw to the next (measured on the world: the grid-best of one seed set barely beat (1, 1)
on fresh seeds). The label is then the score-weighted mean of the grid,
    λ*(p) = Σ_g softmax(score[p, ·] / τ)_g · λ_g
which is the argmax as τ -> 0 and the grid's centre as τ -> ∞; with τ near the scores' noise level, differences
smaller than the noise pull the label toward the middle of the tied points instead of picking one at random.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lorafuse.errors import UserInputError
from lorafuse.fusion.craft.expert import ExpertExample

DEFAULT_LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_POINT = (1.0, 1.0)  # what the markers alone give (λ = 1 per present marker)


@dataclass(frozen=True)
class SpanPrompt:
    """One prompt the grid is run for: the content LoRA's concept ID and the two span texts."""

    concept_id: int
    content_span: str
    style_span: str

    def __post_init__(self) -> None:
        if self.concept_id < 0:
            raise UserInputError(f"concept_id must be >= 0 (0 = unknown concept), got {self.concept_id}")
        for name in ("content_span", "style_span"):
            text = getattr(self, name)
            if not text.strip() or "<" in text or ">" in text:
                raise UserInputError(f"{name} must be non-empty plain text without markers, got {text!r}")

    @property
    def marked(self) -> str:
        """The prompt as a user writes it: 'a sks teapot <c> in sks style <s>'."""
        return f"{self.content_span} <c> {self.style_span} <s>"

    @property
    def clean(self) -> str:
        """What the text encoder sees (the markers removed)."""
        return f"{self.content_span} {self.style_span}"


Lambda = tuple[float, float]
ScoreFn = Callable[[Sequence[SpanPrompt], float, float], np.ndarray]


def lambda_grid(
    values_c: Sequence[float] = DEFAULT_LAMBDAS, values_s: Sequence[float] | None = None
) -> list[Lambda]:
    """Every (λ_c, λ_s) of values_c x values_s (values_s defaults to values_c), λ_c-major."""
    values_s = values_c if values_s is None else values_s
    for name, values in (("λ_c", values_c), ("λ_s", values_s)):
        if not values:
            raise UserInputError(f"the {name} grid is empty; give at least one value such as 1.0")
        bad = [v for v in values if not math.isfinite(v) or v < 0]
        if bad:
            raise UserInputError(
                f"the {name} grid needs finite values >= 0 (the encoder's softplus), got {bad}"
            )
        if len(set(values)) != len(values):
            raise UserInputError(f"the {name} grid repeats a value: {list(values)}")
    return [(float(c), float(s)) for c in values_c for s in values_s]


@dataclass(frozen=True)
class GridSearch:
    """scores[p, g]: the score of prompts[p] fused at grid[g]."""

    prompts: tuple[SpanPrompt, ...]
    grid: tuple[Lambda, ...]
    scores: np.ndarray  # (P, G)
    tie_tolerance: float = 0.0
    temperature: float = 0.0  # 0: examples carry the argmax; > 0: the soft label (module docstring)

    def best_index(self) -> np.ndarray:
        """(P,) grid index of each prompt's best λ pair (ties: nearest to (1, 1))."""
        dist = np.array([math.dist(g, DEFAULT_POINT) for g in self.grid])
        out = []
        for row in self.scores:
            tied = np.flatnonzero(row >= row.max() - self.tie_tolerance)
            out.append(int(tied[np.argmin(dist[tied])]))  # argmin takes the first of equal distances
        return np.array(out, dtype=np.int64)

    def best(self) -> list[Lambda]:
        return [self.grid[i] for i in self.best_index()]

    def soft_best(self, temperature: float | None = None) -> np.ndarray:
        """(P, 2) score-weighted mean (λ_c, λ_s) at `temperature` (default: this search's own; 0 = `best`)."""
        tau = self.temperature if temperature is None else temperature
        if tau < 0 or not math.isfinite(tau):
            raise UserInputError(f"label temperature must be finite and >= 0, got {tau}")
        points = np.asarray(self.grid, dtype=np.float64)  # (G, 2)
        if tau == 0:
            return points[self.best_index()]
        z = (self.scores - self.scores.max(axis=1, keepdims=True)) / tau  # shifted: exp never overflows
        w = np.exp(z)
        return (w / w.sum(axis=1, keepdims=True)) @ points  # (P, G) @ (G, 2)

    def labels(self) -> list[Lambda]:
        """The training label of each prompt: the argmax, or the soft label when `temperature` > 0."""
        return [(float(c), float(s)) for c, s in self.soft_best()]

    def score_of(self, point: Lambda) -> np.ndarray:
        """(P,) scores at one grid point (an error if it is not on the grid)."""
        if point not in self.grid:
            raise UserInputError(f"λ pair {point} is not on the grid {list(self.grid)}")
        return self.scores[:, self.grid.index(point)]

    def examples(self) -> list[ExpertExample]:
        return [
            ExpertExample(p.concept_id, p.content_span, p.style_span, lc, ls)
            for p, (lc, ls) in zip(self.prompts, self.labels(), strict=True)
        ]

    def to_json(self) -> dict:
        return {
            "grid": [list(g) for g in self.grid],
            "temperature": self.temperature,
            "prompts": [
                {"concept_id": p.concept_id, "content_span": p.content_span, "style_span": p.style_span,
                 "scores": [float(v) for v in row], "best": list(self.grid[b]), "label": list(label)}
                for p, row, b, label in zip(self.prompts, self.scores, self.best_index(), self.labels(), strict=True)
            ],
        }  # fmt: skip


def grid_search(
    prompts: Sequence[SpanPrompt], score_fn: ScoreFn, grid: Sequence[Lambda] | None = None, *,
    tie_tolerance: float = 0.0, temperature: float = 0.0, progress: Callable[[int, int], None] | None = None,
) -> GridSearch:  # fmt: skip
    """Score every prompt at every grid point: one `score_fn` call per grid point, with all prompts (so an
    image scorer batches the prompts into one sampling run)."""
    if not prompts:
        raise UserInputError("grid_search needs at least one prompt")
    grid = list(lambda_grid() if grid is None else grid)
    if tie_tolerance < 0:
        raise UserInputError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    if temperature < 0 or not math.isfinite(temperature):
        raise UserInputError(f"label temperature must be finite and >= 0, got {temperature}")
    columns = []
    for k, (lc, ls) in enumerate(grid):
        scores = np.asarray(score_fn(list(prompts), lc, ls), dtype=np.float64)
        if scores.shape != (len(prompts),):
            raise ValueError(
                f"score_fn returned shape {scores.shape} at λ=({lc}, {ls}), expected ({len(prompts)},)"
            )
        if not np.isfinite(scores).all():
            raise ValueError(f"score_fn returned a non-finite score at λ=({lc}, {ls}): {scores.tolist()}")
        columns.append(scores)
        if progress is not None:
            progress(k + 1, len(grid))
    return GridSearch(tuple(prompts), tuple(grid), np.stack(columns, axis=1), tie_tolerance, temperature)


def merge_searches(searches: Sequence[GridSearch]) -> list[ExpertExample]:
    """The examples of several searches (e.g. one per LoRA pair), in order."""
    return [e for s in searches for e in s.examples()]
