"""The demo's page: out/demo/report.html with its PNGs in report_files/, and out/demo/summary.png.

Sections: the training sets (references), base and single-LoRA results, every method side by side (same prompt and
noise seeds), the oracle scores (table with 95 % intervals, bar chart), training loss and LR curves, K-LoRA's
selection schedule, the base model's class x style grid, and the settings.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lorafuse.eval.html import HtmlReport
from lorafuse.eval.measures import describe
from lorafuse.eval.report import FILES, training_logs, training_plot
from lorafuse.eval.world_compare import (
    BASE,
    CONTENT,
    CRAFT_CONTENT,
    CRAFT_STYLE,
    SCORES,
    STYLE,
    CompareResult,
    PairLoras,
    scores_bar_chart,
    side_by_side,
    summary,
    training_images,
)
from lorafuse.utils.images import labelled_grid, save_image


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _references(report: HtmlReport, loras: PairLoras, folder: Path) -> None:
    report.heading("References: the training sets")
    captions = []
    for role, data in (("content", loras.content_data), ("style", loras.style_data)):
        items = training_images(data)
        name = loras.individual if role == "content" else loras.style
        picture = labelled_grid([[_load(p) for p, _ in items]], [role], [p.name for p, _ in items],
                                title=f"{role} dataset: {name}, {len(items)} image(s)")  # fmt: skip
        save_image(picture, folder / f"dataset_{role}.png")
        report.image(f"{FILES}/dataset_{role}.png", f"{role} LoRA training images ({data})")
        captions += [[role, p.name, caption] for p, caption in items]
    report.table(["LoRA", "image", "caption"], captions)


def _subset(result: CompareResult, labels: list[str]) -> CompareResult:
    kept = [label for label in result.labels if label in labels]
    return CompareResult(result.pair, result.prompt, result.seeds, kept, {k: result.images[k] for k in kept})


def summary_picture(grid: Image.Image, chart: Path, path: Path) -> Path:
    """The side-by-side grid above the scores chart, on one white canvas (the README's picture)."""
    with Image.open(chart) as c:
        chart_img = c.convert("RGB")
    width = max(grid.width, chart_img.width)
    canvas = Image.new("RGB", (width, grid.height + chart_img.height), "white")
    canvas.paste(grid, (0, 0))
    canvas.paste(chart_img, ((width - chart_img.width) // 2, grid.height))
    return save_image(canvas, path)


def _class_grid(report: HtmlReport, cfg: Any, grid: np.ndarray, oracle: Any, folder: Path) -> None:
    flat = grid.reshape(-1, *grid.shape[2:])
    verdict = oracle.judge(flat)
    n_cls, n_sty = len(cfg.classes), len(cfg.styles)
    cls_ok = np.array(
        [a == c for a, c in zip(verdict.cls, [c for c in cfg.classes for _ in cfg.styles], strict=True)]
    )
    sty_ok = np.array([a == s for a, s in zip(verdict.style_name, [s for _ in cfg.classes for s in cfg.styles],
                                                strict=True)]).reshape(n_cls, n_sty)  # fmt: skip
    cls_ok = cls_ok.reshape(n_cls, n_sty)
    save_image(labelled_grid(grid, list(cfg.classes), list(cfg.styles), title="built-in base model: class x style"),
               folder / "class_style_grid.png")  # fmt: skip
    report.heading("The base model: class x style")
    report.image(
        f"{FILES}/class_style_grid.png", "one sample per prompt 'a photo of a CLASS, in STYLE style'"
    )
    report.table(["style", "correct class", "correct style"],
                 [["all", float(cls_ok.mean()), float(sty_ok.mean())]]
                 + [[s, float(cls_ok[:, j].mean()), float(sty_ok[:, j].mean())] for j, s in enumerate(cfg.styles)])  # fmt: skip


def write_demo_report(cfg: Any, loras: PairLoras, result: CompareResult, grid: np.ndarray | None, oracle: Any,
                      times: dict[str, float]) -> Path:  # fmt: skip
    """Write <out>/report.html, its pictures and <out>/summary.png; returns the page's path."""
    from lorafuse.fusion.klora_schedule import record_heatmap

    out = Path(cfg.out)
    folder = out / FILES
    report = HtmlReport(f"lorafuse demo: {loras.individual} + {loras.style} on the built-in world")
    report.paragraph(
        f"Prompt '{result.prompt}' (markers <c>/<s> tag CRAFT's spans and are removed before the text encoder), "
        f"noise seeds {', '.join(map(str, result.seeds))}, {cfg.steps} DDIM steps, guidance {cfg.guidance}. "
        "Every image is judged by the oracle encoders, which know the world's ground truth."
    )
    report.table(["stage", "seconds"], [[k, round(v, 1)] for k, v in times.items()])
    _references(report, loras, folder)

    report.heading("Base model and single LoRAs")
    baselines = _subset(result, [BASE, CONTENT, STYLE, CRAFT_CONTENT, CRAFT_STYLE])
    save_image(side_by_side(baselines), folder / "baselines.png")
    report.image(
        f"{FILES}/baselines.png", "the base alone, each LoRA alone (CRAFT's disjoint-layer LoRAs too)"
    )

    report.heading("Every method, side by side")
    everything = side_by_side(result)
    save_image(everything, folder / "side_by_side.png")
    report.image(f"{FILES}/side_by_side.png", "one column per method, one row per noise seed")

    report.heading("Oracle scores")
    report.paragraph(f"Mean [95 % interval] over the {len(result.seeds)} seed(s). " + describe(SCORES))
    header, rows = summary(result.rows)
    report.table(header, rows)
    chart = scores_bar_chart(result.rows, folder / "scores.png", title=f"{result.pair}: oracle scores "
                             f"(mean, 95 % interval over {len(result.seeds)} seed(s))")  # fmt: skip
    report.image(f"{FILES}/scores.png", "oracle content and style similarity and their harmonic mean")
    if result.skipped:
        report.table(["skipped method", "reason"], [[k, v] for k, v in result.skipped.items()])
    summary_picture(everything, chart, out / "summary.png")

    report.heading("Training: loss and learning rate")
    for run in loras.runs:
        for log in training_logs(run):
            plot = training_plot(log, folder, run.parent)
            if plot is not None:
                report.image(f"{FILES}/{plot.name}", f"{run.name}: loss and learning rate")

    klora = result.records.get("klora", {}).get("plan", {})
    if record_heatmap(klora, folder / "klora_schedule.png") is not None:
        report.heading("K-LoRA selection schedule")
        report.image(f"{FILES}/klora_schedule.png", "which LoRA each attention projection uses at each step")

    if grid is not None:
        _class_grid(report, cfg, grid, oracle, folder)
    report.heading("Settings")
    report.parts.append(f"<pre>{html.escape(json.dumps(asdict(cfg), indent=1))}</pre>")
    return report.write(out / "report.html")
