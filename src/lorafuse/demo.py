"""`lorafuse demo`: the whole toolkit on the built-in world, end to end, on a laptop CPU in about 5 minutes.

    1. write a kohya-style dataset for one held-out individual (5 images) and one held-out style (1 image);
    2. train a content LoRA and a style LoRA on them (plus CRAFT's disjoint-layer pair), cached by recipe;
    3. fuse them with every method, same prompt and noise seeds, beside the base and single-LoRA results;
    4. score every image with the oracle encoders (the world's ground truth);
    5. optionally, the first version's class x style grid of the base model;
    6. write out/demo/report.html (`demo_report`), and summary.png: the side-by-side grid over the scores chart.

The LoRAs live under out/demo/work/ (or `work`), keyed by a hash of their recipe: a second run reuses them and
takes the sampling time only.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lorafuse.errors import UserInputError
from lorafuse.utils.images import to_uint8
from lorafuse.world.catalog import CLASS_NAMES, SEEN_STYLES, style_phrase


@dataclass(frozen=True)
class DemoConfig:
    """Every option of the demo. content_epochs / style_epochs / repeats: None keeps the recipe's defaults
    (`train.world_personalize`); smaller values make a quick, worse run (tests)."""

    out: str = "out/demo"
    individual: str = "teapot_08"
    style: str = "crayon"
    seeds: int = 2  # images per row: noise seeds seed .. seed + seeds - 1
    seed: int = 0
    steps: int = 25  # sampling steps
    guidance: float = 4.0  # the world base model's usual scale (benchmarks/base_model_quality.py)
    methods: tuple[str, ...] | None = None  # None: every registered fusion method
    content_epochs: int | None = None
    style_epochs: int | None = None
    repeats: int | None = None
    work: str | None = None  # LoRA cache; None: <out>/work
    class_grid: bool = True  # the base model's class x style grid (first version of the demo)
    classes: tuple[str, ...] = CLASS_NAMES
    styles: tuple[str, ...] = SEEN_STYLES
    base: str | None = None  # a pipeline folder instead of the built-in base model
    device: str | None = None  # where fusion and sampling run (cpu by default; training picks its own)
    dtype: str | None = None  # the base's precision for fusion and sampling: fp32 (default), bf16, fp16
    progress: bool = True

    def check(self) -> None:
        """Every mistake before any training: names, counts, methods."""
        from lorafuse.fusion.registry import get_method
        from lorafuse.utils.devices import resolve_device, resolve_dtype
        from lorafuse.world.catalog import check_style, parse_individual

        resolve_device(self.device)
        resolve_dtype(self.dtype)
        try:
            parse_individual(self.individual)
            for s in (self.style, *self.styles):
                check_style(s)
        except UserInputError as e:
            raise UserInputError(f"demo: individual {self.individual!r}, style {self.style!r}: {e}") from None
        for name in ("seeds", "steps", "content_epochs", "style_epochs", "repeats"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserInputError(f"demo: {name} must be at least 1, got {value}")
        if self.methods is not None:
            if not self.methods:
                raise UserInputError(
                    "demo: methods is empty; give at least one fusion method, or None for all"
                )
            for m in self.methods:
                get_method(m)  # an unknown name fails here, listing the registered ones

    @property
    def work_dir(self) -> Path:
        return Path(self.work) if self.work else Path(self.out) / "work"


def class_style_grid(pipe, classes, styles, steps: int, guidance: float, seed: int, progress: bool = True
                     ) -> np.ndarray:  # fmt: skip
    """Sample one image per (class, style) prompt; returns (len(classes), len(styles), H, W, 3) uint8."""
    out = []
    for r, cls in enumerate(tqdm(classes, desc="class x style grid", unit="row", disable=not progress)):
        prompts = [f"a photo of a {cls}, in {style_phrase(s)} style" for s in styles]
        gen = torch.Generator().manual_seed(seed * 1000 + r)
        imgs = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="np",
                    height=64, width=64).images  # fmt: skip
        out.append(to_uint8(imgs))
    return np.stack(out)


# the report page, scores.json and the tables: a row of scores per image, the settings, the timings
_PAGE_PER_IMAGE, _PAGE = 2 << 10, 64 << 10
_PLOT_DPI = 100  # `eval.report`'s plots


def estimate_report_bytes(cfg: DemoConfig, methods: list[str], recipes: dict) -> int:
    """An upper bound of the demo's output folder less its work folder: the side-by-side grid (a row per seed, a
    column per method and up to five baselines; twice: the page's and summary.png's), the baselines, the class x
    style grid, the training sets' pictures, the scores chart and a training plot per LoRA (plots of
    `eval.report`, RGBA), the page and scores.json."""
    from lorafuse.fusion.klora_schedule import heatmap_pixels
    from lorafuse.utils.atomic import png_bytes
    from lorafuse.utils.images import grid_size
    from lorafuse.world.dataset import SIDE

    def grid(rows: int, cols: int, labels: list[str]) -> int:
        return png_bytes(*grid_size(rows, cols, (SIDE, SIDE), labels, title="t"))

    seeds = [f"seed {cfg.seed + k}" for k in range(cfg.seeds)]
    columns = len(methods) + 5
    sets = [r.images for r in next(iter(recipes.values()))]  # the LoCon pair's training sets
    pictures = grid(cfg.seeds, columns, seeds) + grid(cfg.seeds, 5, seeds) + sum(grid(1, n, ["content"]) for n in sets)
    if cfg.class_grid:
        pictures += grid(len(cfg.classes), len(cfg.styles), list(cfg.classes))
    chart = (round(max(6.0, 0.75 * columns + 2) * _PLOT_DPI), round(3.2 * _PLOT_DPI))
    side_by_side = grid_size(cfg.seeds, columns, (SIDE, SIDE), seeds, title="t")
    summary = png_bytes(max(side_by_side[0], chart[0]), side_by_side[1] + chart[1])
    training = png_bytes(10 * _PLOT_DPI, round(3.2 * _PLOT_DPI), channels=4)  # loss and learning rate, a LoRA
    plots = png_bytes(*chart, channels=4) + 2 * len(recipes) * training
    if "klora" in methods:  # its schedule: layers unknown before the LoRAs exist, so the plot's largest height
        plots += png_bytes(*heatmap_pixels(1 << 20, cfg.steps), channels=4)
    return pictures + summary + plots + columns * cfg.seeds * _PAGE_PER_IMAGE + _PAGE


def estimate_work_bytes(cfg: DemoConfig, recipes: dict) -> int:
    """An upper bound of what the work folder gains: each LoRA not trained yet, its dataset and run."""
    from lorafuse.train.world_personalize import estimate_recipe_bytes

    unique = dict.fromkeys(r for pair in recipes.values() for r in pair)
    return sum(estimate_recipe_bytes(r, cfg.work_dir) for r in unique)


def run_demo(cfg: DemoConfig) -> Path:
    """Run the demo (module docstring); returns the report's path."""
    import warnings

    from lorafuse.demo_report import write_demo_report
    from lorafuse.eval.world_compare import compare_pair, pair_recipes, train_pair_loras
    from lorafuse.fusion.api import load_base
    from lorafuse.fusion.registry import method_names
    from lorafuse.utils.atomic import atomic_write_text
    from lorafuse.world.oracle import default_oracle

    # 1. Check inputs, before any compute
    cfg.check()
    methods = list(cfg.methods) if cfg.methods is not None else method_names()
    from lorafuse.utils.atomic import check_output

    settings: dict[str, dict] = {"content": {}, "style": {}}
    for role, epochs in (("content", cfg.content_epochs), ("style", cfg.style_epochs)):
        if epochs is not None:
            settings[role]["epochs"] = epochs
        if cfg.repeats is not None:
            settings[role]["repeats"] = cfg.repeats
        if cfg.base is not None:
            settings[role]["base"] = cfg.base
    recipes = pair_recipes(cfg.individual, cfg.style, methods=methods, content_settings=settings["content"],
                           style_settings=settings["style"])  # fmt: skip
    out = check_output(cfg.out, kind="folder", what="demo output folder",
                       estimate=estimate_report_bytes(cfg, methods, recipes))  # fmt: skip
    check_output(cfg.work_dir, kind="folder", what="demo work folder", estimate=estimate_work_bytes(cfg, recipes))
    out.mkdir(parents=True, exist_ok=True)
    oracle = default_oracle()  # missing weights fail here, not after training
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    # 2. Datasets and LoRAs (cached by recipe under the work folder)
    loras = train_pair_loras(cfg.individual, cfg.style, cfg.work_dir, methods=methods,
                             content_settings=settings["content"], style_settings=settings["style"],
                             progress=cfg.progress)  # fmt: skip
    times["train LoRAs"] = time.perf_counter() - t0

    # 3-4. Every method beside the base and the single LoRAs, scored by the oracle
    t = time.perf_counter()
    pipe = load_base(cfg.base or "world", device=cfg.device, dtype=cfg.dtype)
    with warnings.catch_warnings():
        # coverage notes (CRAFT and B-LoRA use part of each LoRA, by design) would bury the progress bars
        warnings.simplefilter("ignore")
        result = compare_pair(pipe, loras, oracle=oracle, methods=methods, seeds=cfg.seeds, seed=cfg.seed,
                              steps=cfg.steps, guidance=cfg.guidance, progress=cfg.progress)  # fmt: skip
    times["fuse and score"] = time.perf_counter() - t

    # 5. The base model's class x style grid
    grid = None
    if cfg.class_grid:
        t = time.perf_counter()
        grid = class_style_grid(
            pipe, cfg.classes, cfg.styles, cfg.steps, cfg.guidance, cfg.seed, cfg.progress
        )
        times["class x style grid"] = time.perf_counter() - t

    # 6. Report, summary picture, raw scores
    atomic_write_text(out / "scores.json", json.dumps({"config": asdict(cfg), "prompt": result.prompt,
                                                       "skipped": result.skipped, "rows": result.rows}, indent=1))  # fmt: skip
    times["total"] = time.perf_counter() - t0
    page = write_demo_report(cfg, loras, result, grid, oracle, times)
    for label, reason in result.skipped.items():
        print(f"skipped {label}: {reason}")
    print(f"{len(result.rows)} images scored in {times['total']:.0f} s; report: {page}")
    return page
