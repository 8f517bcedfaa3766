"""The metrics lorafuse reports, one object each: its name, which direction is better, how it is computed and how
it is aggregated over images. The scorer (`eval.scoring`), the grid report (`eval.report`), the method
comparison (`eval.world_compare`) and the demo page (`demo_report`) all read this table.

Adding a metric: one class (or one instance of an existing class) and one line in `METRICS`.

Two kinds:
- measured: a per-image score an embedder gives (the oracle's, CLIP's, DINO's; they embed a batch at once, so
  their scorers fill several columns together; `source` names the scorer);
- derived: computed from other columns of the same image (`compute(scores, content_alone, style_alone)`), e.g.
  the harmonic mean of content and style, or cross-influence against the single-LoRA images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorafuse.eval.metrics import (
    Interval,
    arithmetic_mean,
    ci_product,
    confidence_interval,
    cross_influence,
    harmonic_mean,
    proportion_interval,
)


@dataclass(frozen=True)
class Metric:
    """A per-image score. `higher_is_better` None: no better direction (a cost, a diagnostic). `rate`: 0/1 per
    image, aggregated with a Wilson interval instead of a Student t one. `plot`: among the report's plots."""

    name: str
    doc: str
    higher_is_better: bool | None = True
    rate: bool = False
    plot: bool = False
    source: str = "oracle"

    def aggregate(self, values: Sequence[float]) -> Interval:
        """Mean and 95 % interval over images."""
        return proportion_interval(values) if self.rate else confidence_interval(values)

    def compute(self, scores: Mapping[str, Any], content_alone: Mapping[str, Any] | None = None,
                style_alone: Mapping[str, Any] | None = None) -> float | None:  # fmt: skip
        """Derived metrics compute themselves from the other scores of the image; measured ones are given."""
        return None


@dataclass(frozen=True)
class PairMetric(Metric):
    """A combination of one embedding's content and style scores (`content` / `style` name the columns)."""

    content: str = ""
    style: str = ""
    kind: str = "hmean"  # "amean", "hmean", "ci_product" (fused images), "ci" (needs the single-LoRA images)
    source: str = "derived"

    def compute(self, scores, content_alone=None, style_alone=None) -> float | None:
        if self.content not in scores or self.style not in scores:
            return None
        c, s = scores[self.content], scores[self.style]
        fused = content_alone is not None or style_alone is not None
        if self.kind == "amean":
            return float(arithmetic_mean(c, s))
        if self.kind == "hmean":
            return float(harmonic_mean(c, s))
        if self.kind == "ci_product":
            return float(ci_product(c, s)) if fused else None
        if content_alone and style_alone and self.content in content_alone and self.style in style_alone:
            return float(cross_influence(content_alone[self.content], c, style_alone[self.style], s))
        return None


def _pair(prefix: str, content: str, style: str, plot: tuple[str, ...]) -> list[PairMetric]:
    docs = {
        "amean": "arithmetic mean of content and style",
        "hmean": "harmonic mean of content and style (0 when either is not positive)",
        "ci": "cross-influence ½[(c_single − c_fused)/c_single + (s_single − s_fused)/s_single] against the same "
        "seed's single-LoRA images (undefined when a single-LoRA score is not positive)",
        "ci_product": "c_fused · s_fused of the fused image",
    }
    return [PairMetric(f"{prefix}_{kind}", doc, higher_is_better=kind != "ci", plot=kind in plot, content=content,
                       style=style, kind=kind) for kind, doc in docs.items()]  # fmt: skip


# The report's order: the columns people read first come first.
METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("oracle_content", "mean cosine of the image's oracle embedding to the individual's references", plot=True),
    Metric("oracle_style", "mean cosine of the image's oracle embedding to the style's references", plot=True),
    Metric("right_individual", "the oracle names the right individual", rate=True, plot=True),
    Metric("right_class", "the oracle names the right class", rate=True),
    Metric("right_style", "the oracle names the right style", rate=True, plot=True),
    *_pair("oracle", "oracle_content", "oracle_style", plot=("hmean", "ci")),
    Metric("clip_i_content", "mean CLIP image cosine to the content references", plot=True, source="clip"),
    Metric("clip_i_style", "mean CLIP image cosine to the style references", plot=True, source="clip"),
    Metric("clip_t", "CLIP cosine of the image to its prompt (markers and trigger words removed)", plot=True,
           source="clip"),
    Metric("dino_content", "mean DINO cosine to the content references", plot=True, source="dino"),
    *_pair("clip", "clip_i_content", "clip_i_style", plot=("hmean", "ci")),
    Metric("seconds_per_image", "planning (e.g. ZipLoRA's merger training) and sampling, per image",
           higher_is_better=None, source="timing"),
]}  # fmt: skip


def metric(name: str) -> Metric:
    """The metric called `name`; a column this table does not know is a plain mean with no better direction."""
    return METRICS.get(name) or Metric(name, "", higher_is_better=None, source="unknown")


def derived(scores: Mapping[str, Any], content_alone: Mapping[str, Any] | None = None,
            style_alone: Mapping[str, Any] | None = None) -> dict[str, float]:  # fmt: skip
    """Every derived metric an image's scores allow (cross-influence only given the single-LoRA images' scores)."""
    out = {}
    for m in METRICS.values():
        value = m.compute(scores, content_alone, style_alone)
        if value is not None:
            out[m.name] = value
    return out


def describe(names: Sequence[str]) -> str:
    """One sentence per metric for a report: what it is, and which direction is better."""
    parts = []
    for name in names:
        m = metric(name)
        better = {True: " (higher is better)", False: " (lower is better)", None: ""}[m.higher_is_better]
        kind = "; a rate, Wilson interval" if m.rate else ""
        parts.append(f"{name}: {m.doc}{better}{kind}.")
    return " ".join(parts)
