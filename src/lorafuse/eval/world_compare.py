"""Every fusion method on one (individual, style) pair of the built-in world, scored against ground truth.

The demo and the fusion leaderboard both ask the same question: "with a content LoRA of `teapot_08` and a style
LoRA of `crayon`, what does each method make, and how much of the teapot and of the crayon survives?". This
module answers it once:

    loras = train_pair_loras("teapot_08", "crayon", work_dir, methods=method_names())   # cached by recipe
    result = compare_pair(pipe, loras, oracle=default_oracle(), seeds=4, steps=25)
    result.rows      # one dict per image: label, kind, seed, oracle scores, docs/algorithms.md §7.6 aggregates, seconds per image
    result.images    # label -> (seeds, H, W, 3) uint8, the same prompt and noise seeds in every row

What runs, in order: the base model alone, the content LoRA alone, the style LoRA alone, then every method through
`lorafuse.fuse` (the single-LoRA rows are `direct` fusion with the other weight 0, which equals that LoRA alone:
one sampling path for everything). A method declares the layers its LoRAs should cover (`FusionMethod.lora_layers`):
CRAFT needs LoRAs trained on disjoint layer sets (`layers="craft"` recipes); every other method, B-LoRA included
(it takes its two blocks from them), gets the attention LoRAs. Such a method's cross-influence is measured against
its own LoRAs alone ("craft content only" / "craft style only" rows), so every method is compared with the LoRAs
it actually fused.

Prompt: "a photo of a sks teapot <c>, in sks style <s>" (the trigger words the world datasets train with; the
markers tag CRAFT's spans and are removed before the text encoder, for every method). A method that learns from
references (`FusionMethod.needs_references`: ZipLoRA) gets the first image of each training set with its caption,
as the ZipLoRA paper does. A method that cannot run with these
inputs is skipped with its reason, as `lorafuse fuse --method all` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorafuse.errors import UserInputError
from lorafuse.eval.measures import derived
from lorafuse.eval.metrics import OracleScorer
from lorafuse.eval.report import group_stats

ATTENTION = "attention"  # the layer set of the shared pair; other sets are trained only for methods that ask
BASE, CONTENT, STYLE = "base", "content only", "style only"
CRAFT_CONTENT, CRAFT_STYLE = "craft content only", "craft style only"  # the rows of CRAFT's own LoRAs alone
# the columns people read first; every row has them (the right_* rates are 0/1 per image)
SCORES = ("oracle_content", "oracle_style", "right_individual", "right_style", "oracle_hmean", "oracle_ci",
          "seconds_per_image")  # fmt: skip


@dataclass(frozen=True)
class PairLoras:
    """The trained LoRAs of one pair and their datasets. `own`: layer set -> (content, style) LoRAs for methods
    whose `lora_layers` is not the attention pair (CRAFT's "craft")."""

    individual: str
    style: str
    content: Path
    style_lora: Path
    content_data: Path
    style_data: Path
    own: Mapping[str, tuple[Path, Path]] = field(default_factory=dict)
    runs: tuple[Path, ...] = ()  # the trainer's run folders (loss CSV logs), for the report's curves

    @property
    def name(self) -> str:
        return f"{self.individual}+{self.style}"


def train_pair_loras(individual: str, style: str, work_dir: str | Path, *, methods: Sequence[str],
                     content_settings: Mapping[str, Any] | None = None,
                     style_settings: Mapping[str, Any] | None = None, progress: bool = True) -> PairLoras:  # fmt: skip
    """Write the datasets and train (or reuse, keyed by recipe) the LoRAs `methods` need: the attention pair
    always (the baselines), and a pair on each other layer set a method asks for (`lora_layers`, e.g. CRAFT's
    disjoint sets). `*_settings` override recipe fields (e.g. epochs=1 for a smoke run)."""
    from lorafuse.train.world_personalize import recipe_paths, style_recipe, subject_recipe, train_world_lora

    c_recipe = subject_recipe(individual, **dict(content_settings or {}))
    s_recipe = style_recipe(style, **dict(style_settings or {}))
    recipes = [c_recipe, s_recipe]
    layer_sets = _layer_sets(methods)
    for layers in layer_sets:
        recipes += [subject_recipe(individual, **{**dict(content_settings or {}), "layers": layers}),
                    style_recipe(style, **{**dict(style_settings or {}), "layers": layers})]  # fmt: skip
    paths = [train_world_lora(r, work_dir, progress=progress) for r in recipes]
    own = {layers: (paths[2 + 2 * i], paths[3 + 2 * i]) for i, layers in enumerate(layer_sets)}
    return PairLoras(
        individual=individual, style=style, content=paths[0], style_lora=paths[1],
        content_data=recipe_paths(c_recipe, work_dir)[0], style_data=recipe_paths(s_recipe, work_dir)[0],
        own=own, runs=tuple(recipe_paths(r, work_dir)[1] for r in recipes),
    )  # fmt: skip


def _layer_sets(methods: Sequence[str]) -> list[str]:
    """The layer sets other than the attention pair that `methods` need their own LoRAs on, in method order."""
    from lorafuse.fusion.registry import get_method

    return list(dict.fromkeys(get_method(m).lora_layers for m in methods if get_method(m).lora_layers != ATTENTION))


def _alone_labels(layers: str) -> tuple[str, str]:
    """The rows of one layer set's LoRAs alone: ("content only", "style only") for the attention pair."""
    return (CONTENT, STYLE) if layers == ATTENTION else (f"{layers} {CONTENT}", f"{layers} {STYLE}")


def training_images(data_dir: Path) -> list[tuple[Path, str]]:
    """(image, caption) of a world dataset folder, read as the trainer reads it (kohya layout)."""
    from lorafuse.train.config import DatasetConfig
    from lorafuse.train.data import scan_dataset

    index = scan_dataset(DatasetConfig(train_data_dir=data_dir, resolution=64))
    return [(item.path, item.caption) for item in index.items]


def pair_prompt(individual: str) -> str:
    """The fused prompt, with CRAFT's markers: 'a photo of a sks teapot <c>, in sks style <s>'."""
    from lorafuse.world.catalog import parse_individual
    from lorafuse.world.dataset import DEFAULT_TRIGGER

    cls = parse_individual(individual).cls
    return f"a photo of a {DEFAULT_TRIGGER} {cls} <c>, in {DEFAULT_TRIGGER} style <s>"


def method_options(method: str, loras: PairLoras) -> dict[str, Any]:
    """What a method needs beyond the two LoRAs on the world: the references of a method that learns from them
    (ZipLoRA: first training image and its caption of each dataset; the merger training reads images, not prompts
    with markers)."""
    from lorafuse.fusion.registry import get_method

    if not get_method(method).needs_references:
        return {}
    (c_img, c_cap), (s_img, s_cap) = (
        training_images(loras.content_data)[0],
        training_images(loras.style_data)[0],
    )
    return {
        "content_image": str(c_img),
        "content_prompt": c_cap,
        "style_image": str(s_img),
        "style_prompt": s_cap,
    }


@dataclass
class CompareResult:
    pair: str
    prompt: str
    seeds: list[int]
    labels: list[str] = field(default_factory=list)  # rows of the side-by-side picture, in run order
    images: dict[str, np.ndarray] = field(default_factory=dict)  # label -> (seeds, H, W, 3) uint8
    records: dict[str, dict] = field(default_factory=dict)  # label -> `lorafuse.fuse` record
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per image
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why it could not run


def _runs(loras: PairLoras, methods: Sequence[str]) -> list[tuple[str, str, str, Path, Path, dict[str, Any]]]:
    """(label, kind, method, content file, style file, options) of every row, baselines first."""
    runs = [(BASE, "base", "direct", loras.content, loras.style_lora, {"content_weight": 0.0, "style_weight": 0.0}),
            (CONTENT, "content", "direct", loras.content, loras.style_lora, {"style_weight": 0.0}),
            (STYLE, "style", "direct", loras.content, loras.style_lora, {"content_weight": 0.0})]  # fmt: skip
    from lorafuse.fusion.registry import get_method

    files = {ATTENTION: (loras.content, loras.style_lora), **loras.own}
    for layers in _layer_sets(methods):
        if layers not in files:
            raise UserInputError(f"{loras.name}: methods on layer set {layers!r} need LoRAs trained on it; train "
                                 f"the pair with those methods among `methods` (layers={layers!r} recipes)")  # fmt: skip
        first = next(m for m in methods if get_method(m).lora_layers == layers)
        c_label, s_label = _alone_labels(layers)
        runs += [(c_label, "content", first, *files[layers], {"style_weight": 0.0}),
                 (s_label, "style", first, *files[layers], {"content_weight": 0.0})]  # fmt: skip
    for m in methods:
        runs.append((m, "fused", m, *files[get_method(m).lora_layers], {}))
    return runs


def compare_pair(pipe: Any, loras: PairLoras, *, oracle: Any, methods: Sequence[str] | None = None,
                 seeds: int = 2, seed: int = 0, steps: int = 25, guidance: float = 4.0,
                 options: Mapping[str, Mapping[str, Any]] | None = None, progress: bool = True) -> CompareResult:  # fmt: skip
    """Sample `seeds` images (noise seeds seed .. seed + seeds - 1) per row of `_runs`, score them with the oracle
    against the pair's references, and return rows, images and records. `options`: extra options per method."""
    from tqdm.auto import tqdm

    from lorafuse.fusion.api import fuse
    from lorafuse.fusion.registry import method_names

    methods = list(method_names() if methods is None else methods)
    if seeds < 1 or steps < 1:
        raise UserInputError(f"seeds and steps must be at least 1, got seeds={seeds}, steps={steps}")
    prompt = pair_prompt(loras.individual)
    scorer = OracleScorer(oracle, individual=loras.individual, style=loras.style)
    result = CompareResult(loras.name, prompt, list(range(seed, seed + seeds)))
    scores: dict[str, dict[str, np.ndarray]] = {}
    runs = _runs(loras, methods)
    for label, kind, method, content, style, weights in tqdm(
        runs, desc=f"{loras.name}", disable=not progress
    ):
        extra = {**method_options(method, loras), **dict((options or {}).get(method, {})), **weights}
        try:
            # one call per row, all seeds in one batch: image k has noise seed `seed + k` in every row
            out = fuse(content, style, prompt=prompt, method=method, base=pipe, num_images=seeds, steps=steps,
                       guidance=guidance, seed=seed, progress=False, **extra)  # fmt: skip
        except UserInputError as e:
            if kind != "fused":  # a baseline that cannot run means the comparison means nothing
                raise
            result.skipped[label] = str(e)
            continue
        images = out.uint8()
        result.labels.append(label)
        result.images[label], result.records[label] = images, out.record
        scores[label] = scorer(images)
        timings = out.record["timings_s"]
        for k in range(seeds):
            row = {"pair": loras.name, "individual": loras.individual, "style": loras.style, "method": label,
                   "kind": kind, "seed": seed + k, "cell": f"{loras.name}/{label}/{seed + k}",
                   **{key: _plain(v[k]) for key, v in scores[label].items()},
                   # plan time (ZipLoRA's merger training, K-LoRA's precompute) is shared by the batch
                   "seconds_per_image": (timings["plan"] + timings["sample"]) / seeds,
                   "plan_s": timings["plan"]}  # fmt: skip
            result.rows.append(row)
    _add_aggregates(result.rows)
    return result


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _add_aggregates(rows: list[dict[str, Any]]) -> None:
    """docs/algorithms.md §7.6 means for every row, and cross-influence for fused rows against the same seed's single-LoRA rows of
    the LoRAs that method fused (CRAFT's own, the attention pair for the others)."""
    from lorafuse.fusion.registry import get_method

    by_key = {(r["pair"], r["method"], r["seed"]): r for r in rows}
    for r in rows:
        if r["kind"] != "fused":
            r.update(derived(r))
            continue
        singles = _alone_labels(get_method(r["method"]).lora_layers)
        alone = [by_key.get((r["pair"], s, r["seed"]), {}) for s in singles]
        r.update(derived(r, *alone))


def summary(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = SCORES,
            by: Sequence[str] = ("method",)) -> tuple[list[str], list[list[Any]]]:  # fmt: skip
    """(header, rows) of mean [95 % interval] per group, in the order groups first appear; a group of one image
    shows its value alone (an interval of one sample says nothing)."""
    stats = {m: group_stats(rows, list(by), m) for m in metrics}
    keys = list(dict.fromkeys(tuple(r.get(a) for a in by) for r in rows))
    table = []
    for key in keys:
        cells = []
        for m in metrics:
            iv = stats[m].get(key)
            cells.append("" if iv is None else (f"{iv.mean:.3f}" if iv.n == 1 else str(iv)))
        table.append([*key, *cells])
    return [*by, *metrics], table


def side_by_side(result: CompareResult, *, title: str | None = None):
    """A labelled grid: one column per row label (base, singles, methods), one row per seed."""
    from lorafuse.utils.images import labelled_grid

    cols = result.labels
    grid = [[result.images[label][k] for label in cols] for k in range(len(result.seeds))]
    return labelled_grid(grid, [f"seed {s}" for s in result.seeds], cols, title=title or result.prompt)


def scores_bar_chart(rows: Sequence[dict[str, Any]], path: str | Path, *,
                     metrics: Sequence[str] = ("oracle_content", "oracle_style", "oracle_hmean"),
                     title: str = "oracle scores (mean, 95 % interval)") -> Path:  # fmt: skip
    """Grouped bars: one group per method (run order), one bar per metric, error bars the 95 % interval over
    every image of that method (seeds, and pairs when several)."""
    from lorafuse.eval.report import _plt, _save

    plt = _plt()
    labels = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(labels) + 2), 3.2))
    for j, metric in enumerate(metrics):
        stats = group_stats(rows, ["method"], metric)
        ivs = [stats.get((label,)) for label in labels]
        pos = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(labels))]
        means = [iv.mean if iv else np.nan for iv in ivs]
        err = [[iv.mean - iv.low if iv else 0 for iv in ivs], [iv.high - iv.mean if iv else 0 for iv in ivs]]
        ax.bar(pos, means, width, yerr=err, capsize=2, label=metric)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.axhline(0, color="#888", lw=0.6)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncols=len(metrics))
    fig.tight_layout()
    return _save(fig, Path(path))
