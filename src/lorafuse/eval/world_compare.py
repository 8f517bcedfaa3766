"""Every fusion method on one (individual, style) pair of the built-in world, scored against ground truth.

The demo and the fusion leaderboard both ask the same question: "with a content LoRA of `teapot_08` and a style
LoRA of `crayon`, what does each method make, and how much of the teapot and of the crayon survives?". This
module answers it once:

    loras = train_pair_loras("teapot_08", "crayon", work_dir, methods=method_names())   # cached by recipe
    result = compare_pair(pipe, loras, oracle=default_oracle(), seeds=4, steps=25)
    result.rows      # one dict per image: label, kind, seed, oracle scores, docs/algorithms.md §7.6 aggregates, seconds per image
    result.images    # label -> (seeds, H, W, 3) uint8, the same prompt and noise seeds in every row

What runs, in order: the base model alone, the single LoRAs of every input set, then every method through
`lorafuse.fuse` (the single-LoRA rows are `direct` fusion with the other weight 0, which equals that LoRA alone:
one sampling path for everything). Every row says which LoRAs it fused (`inputs`, a key of `INPUT_RECIPES`). By
default a method gets the input set it declares (`FusionMethod.lora_layers`): the all-layer LoCon LoRAs of
`train.world_personalize`'s recipes ("locon", what users have) for every method that accepts any LoRA (B-LoRA takes
its two blocks from them), CRAFT its disjoint-layer pair ("craft"). `paper_runs` adds each method on the inputs
its paper prescribes (`FusionMethod.paper_inputs`), and `compare_pair(runs=...)` runs any (label, kind, method,
inputs, options) list. Cross-influence is measured against the single-LoRA rows of the same inputs, so every
method is compared with the LoRAs it actually fused.

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

BASE, CONTENT, STYLE = "base", "content only", "style only"
CRAFT_CONTENT, CRAFT_STYLE = "craft content only", "craft style only"  # the rows of CRAFT's own LoRAs alone
LOCON = "locon"  # the shared pair: the baselines, and the datasets every input set trains on
# Input sets: the recipe changes (over train.world_personalize's subject_recipe / style_recipe) that train each pair.
INPUT_RECIPES: dict[str, dict[str, Any]] = {
    LOCON: {},  # the recipes' defaults: every layer with LoCon 3x3 convs (the LoRAs users have)
    "attn": {"layers": "attn", "conv_rank": 0},  # attention projections only (K-LoRA, ZipLoRA, NP-LoRA papers)
    "blora": {"layers": "blora", "conv_rank": 0},  # ONE LoRA on B-LoRA's two blocks, trained jointly
    "craft": {"layers": "craft"},  # CRAFT's disjoint content / style layer sets
}
# the columns people read first; every row has them (the right_* rates are 0/1 per image)
SCORES = ("oracle_content", "oracle_style", "right_individual", "right_style", "oracle_hmean", "oracle_ci",
          "seconds_per_image")  # fmt: skip

Run = tuple[str, str, str, str, dict[str, Any]]  # (label, kind, method, input set, options)


@dataclass(frozen=True)
class PairLoras:
    """The trained LoRAs of one pair and their datasets. `own`: input set -> (content, style) LoRAs for the sets
    other than the LoCon pair (`content`, `style_lora`)."""

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

    def files(self, inputs: str) -> tuple[Path, Path]:
        """(content, style) LoRA files of an input set; a set that was not trained is an error naming it."""
        if inputs == LOCON:
            return self.content, self.style_lora
        if inputs not in self.own:
            raise UserInputError(f"{self.name}: no LoRAs trained for input set {inputs!r}; train the pair with "
                                 f"input_sets (or methods) that include it (known: {', '.join(INPUT_RECIPES)})")  # fmt: skip
        return self.own[inputs]


def input_sets_of(runs: Sequence[Run]) -> list[str]:
    """The input sets `runs` use, the LoCon pair first (the baselines and the datasets come from it)."""
    return list(dict.fromkeys([LOCON, *(r[3] for r in runs)]))


def pair_recipes(individual: str, style: str, *, methods: Sequence[str], content_settings: Mapping[str, Any] | None = None,
                 style_settings: Mapping[str, Any] | None = None, input_sets: Sequence[str] | None = None
                 ) -> dict[str, tuple[Any, Any]]:  # fmt: skip
    """{input set: (content recipe, style recipe)} that `train_pair_loras` trains, the LoCon pair first."""
    from lorafuse.train.world_personalize import style_recipe, subject_recipe

    wanted = list(input_sets) if input_sets is not None else input_sets_of(default_runs(methods))
    unknown = sorted(set(wanted) - set(INPUT_RECIPES))
    if unknown:
        raise UserInputError(f"unknown input set(s) {unknown}; choose from {', '.join(INPUT_RECIPES)}")
    recipes = {}
    for inputs in dict.fromkeys([LOCON, *wanted]):
        change = INPUT_RECIPES[inputs]
        recipes[inputs] = (subject_recipe(individual, **{**dict(content_settings or {}), **change}),
                           style_recipe(style, **{**dict(style_settings or {}), **change}))  # fmt: skip
    return recipes


def train_pair_loras(individual: str, style: str, work_dir: str | Path, *, methods: Sequence[str],
                     content_settings: Mapping[str, Any] | None = None,
                     style_settings: Mapping[str, Any] | None = None, progress: bool = True,
                     input_sets: Sequence[str] | None = None) -> PairLoras:  # fmt: skip
    """Write the datasets and train (or reuse, keyed by recipe) the LoRAs of every input set: the LoCon pair
    always (the baselines), and the set each of `methods` declares (`lora_layers`, e.g. CRAFT's disjoint sets);
    `input_sets` names them explicitly instead (keys of `INPUT_RECIPES`). `*_settings` override recipe fields
    (e.g. epochs=1 for a smoke run)."""
    from lorafuse.train.world_personalize import recipe_paths, train_world_lora

    recipes = pair_recipes(individual, style, methods=methods, content_settings=content_settings,
                           style_settings=style_settings, input_sets=input_sets)  # fmt: skip
    files = {k: tuple(train_world_lora(r, work_dir, progress=progress) for r in pair) for k, pair in recipes.items()}
    c_recipe, s_recipe = recipes[LOCON]
    return PairLoras(
        individual=individual, style=style, content=files[LOCON][0], style_lora=files[LOCON][1],
        content_data=recipe_paths(c_recipe, work_dir)[0], style_data=recipe_paths(s_recipe, work_dir)[0],
        own={k: v for k, v in files.items() if k != LOCON},
        runs=tuple(recipe_paths(r, work_dir)[1] for pair in recipes.values() for r in pair),
    )  # fmt: skip


def single_labels(inputs: str) -> tuple[str, str]:
    """The rows of one input set's LoRAs alone: ("content only", "style only") for the LoCon pair."""
    return (CONTENT, STYLE) if inputs == LOCON else (f"{inputs} {CONTENT}", f"{inputs} {STYLE}")


def training_images(data_dir: Path) -> list[tuple[Path, str]]:
    """(image, caption) of a world dataset folder, read as the trainer reads it (kohya layout)."""
    from lorafuse.train.config import DatasetConfig
    from lorafuse.train.scan import scan_dataset

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


def default_runs(methods: Sequence[str]) -> list[Run]:
    """Every method once, on the input set it declares (`lora_layers`), labelled by the method's name."""
    from lorafuse.fusion.registry import get_method

    return [(m, "fused", m, get_method(m).lora_layers, {}) for m in methods]


def paper_runs(methods: Sequence[str]) -> list[Run]:
    """Every method on the inputs and options its paper prescribes (`paper_inputs`), labelled 'method [inputs]'
    ('method official [inputs]' when only the options differ from its default run)."""
    from lorafuse.fusion.registry import get_method

    out: list[Run] = []
    for m in methods:
        inputs, options = get_method(m).paper_inputs
        label = f"{m} official" if options and inputs == get_method(m).lora_layers else m
        out.append((f"{label} [{inputs}]", "fused", m, inputs, dict(options)))
    return out


def _with_baselines(runs: Sequence[Run]) -> list[Run]:
    """`runs` after the base row and the single-LoRA rows of every input set they use. A single row is `direct`
    with the other weight 0, or, for a set some method cannot run without (`lora_layers`, CRAFT's), that method
    with the other weight 0 (CRAFT's singles keep its layer routing and guidance)."""
    from lorafuse.fusion.registry import get_method

    out: list[Run] = [(BASE, "base", "direct", LOCON, {"content_weight": 0.0, "style_weight": 0.0})]
    for inputs in dict.fromkeys(r[3] for r in runs):
        own = [m for _, _, m, used, _ in runs if used == inputs and get_method(m).lora_layers == inputs != LOCON]
        method = own[0] if own else "direct"
        content, style = single_labels(inputs)
        out += [(content, "content", method, inputs, {"style_weight": 0.0}),
                (style, "style", method, inputs, {"content_weight": 0.0})]  # fmt: skip
    return out + list(runs)


def compare_pair(pipe: Any, loras: PairLoras, *, oracle: Any, methods: Sequence[str] | None = None,
                 seeds: int = 2, seed: int = 0, steps: int = 25, guidance: float = 4.0,
                 options: Mapping[str, Mapping[str, Any]] | None = None, progress: bool = True,
                 runs: Sequence[Run] | None = None) -> CompareResult:  # fmt: skip
    """Sample `seeds` images (noise seeds seed .. seed + seeds - 1) per row, score them with the oracle against the
    pair's references, and return rows, images and records. Rows: `runs` (default `default_runs(methods)`) after
    the base and the single LoRAs of each input set. `options`: extra options per method."""
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
    runs = _with_baselines(default_runs(methods) if runs is None else runs)
    for label, kind, method, inputs, run_options in tqdm(runs, desc=f"{loras.name}", disable=not progress):
        content, style = loras.files(inputs)
        extra = {**method_options(method, loras), **dict((options or {}).get(method, {})), **run_options}
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
                   "kind": kind, "fusion": method, "inputs": inputs, "seed": seed + k,
                   "cell": f"{loras.name}/{label}/{seed + k}",
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
    """docs/algorithms.md §7.6 means for every row, and cross-influence for fused rows against the same seed's
    single-LoRA rows of the LoRAs that row fused (its input set)."""
    by_key = {(r["pair"], r["method"], r["seed"]): r for r in rows}
    for r in rows:
        if r["kind"] != "fused":
            r.update(derived(r))
            continue
        singles = single_labels(r["inputs"])
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
