"""`lorafuse report RUN_DIR`: one self-contained HTML page (PNGs beside it in report_files/) for a run folder.

What it shows, each section only when its inputs exist in RUN_DIR:
- settings: grid.toml (the config as run) or record.json (a `lorafuse fuse` run);
- grids: grid_pNN.png pages of `lorafuse grid`, and other top-level PNGs (e.g. `lorafuse fuse`'s grid.png);
- metric tables from cells.json: mean and 95 % t-interval over seeds per setting, then every cell;
- plots: each metric against each numeric or checkpoint axis (LoRA weight, epoch, steps, ...);
- training curves from a trainer's CSV log (any *.csv with `step` and `loss` columns; `lr*` columns as LR);
- K-LoRA selection schedules: *schedule*.png files, or drawn from a grid cell's record.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorafuse.errors import UserInputError
from lorafuse.eval.html import HtmlReport
from lorafuse.eval.measures import METRICS
from lorafuse.eval.measures import metric as measure
from lorafuse.eval.metrics import Interval
from lorafuse.utils.atomic import check_output

FILES = "report_files"
# what the plots show, at most PLOT_METRICS of them (the tables have everything)
PLOT_METRICS = 8
SERIES_PREF = ("method", "checkpoint", "base", "style_checkpoint")


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: reports are made on machines without a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from lorafuse.utils.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    _plt().close(fig)
    return path


def metric_names(rows: Sequence[dict[str, Any]], axes: Sequence[str]) -> list[str]:
    """Numeric score columns present, the known metrics first in their table's order (`eval.measures`)."""
    skip = set(axes) | {"cell", "image", "kind"}
    numeric = [k for k in dict.fromkeys(k for r in rows for k in r)
               if k not in skip and any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows)]  # fmt: skip
    return [m for m in METRICS if m in numeric] + [m for m in numeric if m not in METRICS]


def group_stats(rows: Sequence[dict[str, Any]], by: Sequence[str], metric: str) -> dict[tuple, Interval]:
    """Mean and 95 % interval of `metric` over the rows sharing each combination of `by` values: Student t, or
    Wilson for the 0/1 rates (right_*). A cell that appears under several grid coordinates (an option its method
    does not have) counts once per group: the same image twice is not two samples."""
    groups: dict[tuple, dict[Any, float]] = {}
    for i, r in enumerate(rows):
        value = r.get(metric)
        if isinstance(value, (int, float)):
            groups.setdefault(tuple(r.get(a) for a in by), {})[r.get("cell", i)] = float(value)
    return {k: measure(metric).aggregate(list(v.values())) for k, v in groups.items()}


def _short(axis: str, value: Any) -> str:
    if axis in ("checkpoint", "style_checkpoint", "base") and value is not None:
        return Path(str(value)).stem
    return f"{value:g}" if isinstance(value, float) else str(value)


def _metric_tables(report: HtmlReport, doc: dict[str, Any], metrics: list[str]) -> None:
    rows, varying = doc["cells"], [a for a in doc.get("varying", []) if a != "seed"]
    report.heading("Metrics")
    report.paragraph("Mean [95 % interval: Student t; Wilson for the right_* rates] over the cells of each setting (seeds and any axis not shown). "
                     "Cross-influence (ci): ½[(c_single − c_fused)/c_single + (s_single − s_fused)/s_single], lower "
                     "is better; ci_product = c·s of the fused image; hmean: harmonic mean of content and style.")  # fmt: skip
    stats = {m: group_stats(rows, varying, m) for m in metrics}
    keys = list(dict.fromkeys(tuple(r.get(a) for a in varying) for r in rows))
    table = [[*(_short(a, v) for a, v in zip(varying, k, strict=True)), *(str(stats[m][k]) if k in stats[m] else ""
              for m in metrics)] for k in keys]  # fmt: skip
    report.table([*varying, *metrics] if varying else ["all", *metrics],
                 table if varying else [["all", *row] for row in table])  # fmt: skip
    if len(rows) <= 300:  # beyond that the CSV is the better place to look
        report.heading("Every cell", 3)
        axes = doc.get("varying") or []
        report.table(["image", *axes, *metrics],
                     [[r["cell"], *(_short(a, r.get(a)) for a in axes), *(r.get(m, "") for m in metrics)] for r in rows])  # fmt: skip


def _x_values(rows: Sequence[dict[str, Any]], axis: str) -> list[Any] | None:
    """Plot positions: numbers as they are, checkpoints (epochs) in their listed order; other axes: no plot."""
    values = list(dict.fromkeys(r.get(axis) for r in rows))
    if axis in ("checkpoint", "style_checkpoint"):
        return values
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values
    return None


def metric_plots(doc: dict[str, Any], metrics: list[str], folder: Path) -> list[Path]:
    """One figure per plottable varying axis: each metric (up to PLOT_METRICS) against it, one line per value of
    a series axis (method, checkpoint, ...), error bars the 95 % t-interval over everything else."""
    plt = _plt()
    rows, varying = doc["cells"], doc.get("varying", [])
    shown = ([m for m in metrics if measure(m).plot] or metrics)[:PLOT_METRICS]
    paths = []
    for axis in (a for a in varying if a != "seed"):  # seeds are what the error bars average over
        xs = _x_values(rows, axis)
        if xs is None or not shown:
            continue
        series = next((a for a in (*SERIES_PREF, *varying) if a in varying and a not in (axis, "seed")
                       and len({r.get(a) for r in rows}) <= 6), None)  # fmt: skip
        ncols = min(4, len(shown))
        nrows = -(-len(shown) // ncols)
        fig, axs = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
        for ax in axs.flat[len(shown) :]:
            ax.set_visible(False)
        for ax, metric in zip(axs.flat, shown, strict=False):
            stats = group_stats(rows, [axis] + ([series] if series else []), metric)
            for s in dict.fromkeys(k[1] if series else None for k in stats):
                pts = [
                    (i, stats[(x, s) if series else (x,)])
                    for i, x in enumerate(xs)
                    if ((x, s) if series else (x,)) in stats
                ]
                pos = [i if axis.endswith("checkpoint") else xs[i] for i, _ in pts]
                ys = [iv.mean for _, iv in pts]
                err = [[iv.mean - iv.low for _, iv in pts], [iv.high - iv.mean for _, iv in pts]]
                ax.errorbar(
                    pos,
                    ys,
                    yerr=err,
                    marker="o",
                    ms=3,
                    capsize=2,
                    label=_short(series, s) if series else None,
                )
            ax.set_title(metric, fontsize=9)
            if measure(metric).rate:
                ax.set_ylim(-0.05, 1.05)
            ax.set_xlabel("epoch / checkpoint" if axis == "checkpoint" else axis, fontsize=8)
            if axis.endswith("checkpoint"):
                ax.set_xticks(range(len(xs)), [_short(axis, x) for x in xs], fontsize=6, rotation=30)
            if series:
                ax.legend(fontsize=6)
        fig.tight_layout()
        paths.append(_save(fig, folder / f"metrics_vs_{axis.replace('.', '_')}.png"))
    return paths


def _read_csv(path: Path) -> list[dict[str, float]]:
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            parsed = {}
            for k, v in row.items():
                try:
                    parsed[k] = float(v)
                except (TypeError, ValueError):
                    continue
            out.append(parsed)
    return out


def training_logs(run_dir: Path) -> list[Path]:
    """CSV files with `step` and `loss` columns: the trainer's logs/NAME.csv, else any in RUN_DIR. (Checkpoint
    folders hold copies of the log up to their step; plotting those too would repeat the same curve.)"""
    candidates = sorted(run_dir.glob("logs/*.csv")) or sorted(run_dir.glob("*.csv"))
    found = []
    for path in candidates:
        if path.name == "cells.csv":
            continue
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), [])
        if "step" in header and "loss" in header:
            found.append(path)
    return found


def training_plot(log: Path, folder: Path, run_dir: Path) -> Path | None:
    rows = [r for r in _read_csv(log) if "step" in r and "loss" in r]
    if not rows:
        return None
    plt = _plt()
    lr_keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k.startswith("lr")]
    fig, axs = plt.subplots(1, 2 if lr_keys else 1, figsize=(10 if lr_keys else 5.5, 3.2), squeeze=False)
    steps = [r["step"] for r in rows]
    axs[0][0].plot(steps, [r["loss"] for r in rows], lw=0.8, alpha=0.5, label="loss")
    if any("loss_avg" in r for r in rows):
        axs[0][0].plot(steps, [r.get("loss_avg", float("nan")) for r in rows], lw=1.5, label="epoch mean")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:  # lorafuse train's held-out loss at fixed noise and timesteps
        axs[0][0].plot(*zip(*val, strict=True), "o-", lw=1.5, ms=3, label="validation loss")
    axs[0][0].set_xlabel("step")
    axs[0][0].set_title("training loss", fontsize=9)
    axs[0][0].legend(fontsize=7)
    for key in lr_keys:
        axs[0][1].plot(steps, [r.get(key, float("nan")) for r in rows], lw=1.2, label=key)
    if lr_keys:
        axs[0][1].set_xlabel("step")
        axs[0][1].set_title("learning rate", fontsize=9)
        axs[0][1].legend(fontsize=7)
    fig.tight_layout()
    name = "_".join(log.relative_to(run_dir).with_suffix("").parts)
    return _save(fig, folder / f"training_{name}.png")


def _schedule_from_cells(run_dir: Path, folder: Path) -> Path | None:
    """The first K-LoRA schedule recorded by a grid cell, drawn as the paper's Figure 6."""
    from lorafuse.fusion.klora_schedule import record_heatmap

    for record_path in sorted((run_dir / "cells").glob("*.json")):
        drawn = record_heatmap(json.loads(record_path.read_text()).get("plan", {}), folder / "klora_schedule.png",
                               title=f"K-LoRA choices, cell {record_path.stem}")  # fmt: skip
        if drawn is not None:
            return drawn
    return None


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN_DIR/report.html (or `out`) with its PNGs in report_files/ beside it; returns the page path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserInputError(
            f"{run_dir}: not a folder; give the output folder of `lorafuse grid`, `fuse` or `train`"
        )
    page = Path(out) if out is not None else run_dir / "report.html"
    if not _has_content(run_dir):
        raise UserInputError(
            f"{run_dir}: nothing to report: no images, cells.json, training log or settings file in it; give the "
            "output folder of `lorafuse grid`, `fuse` or `train`"
        )
    check_output(page, what="report page")
    folder = page.parent / FILES
    report = HtmlReport(f"lorafuse report: {run_dir.name}")

    def rel(p: Path) -> str:
        return (
            Path(p).resolve().relative_to(page.parent.resolve()).as_posix()
            if _inside(p, page.parent)
            else str(p)
        )

    doc = json.loads((run_dir / "cells.json").read_text()) if (run_dir / "cells.json").is_file() else None
    pngs = sorted(p for p in run_dir.glob("*.png"))
    pages = [p for p in pngs if p.name.startswith("grid_p")]
    if pages or pngs:
        report.heading("Grids" if pages else "Images")
        if doc:
            lay = doc.get("layout", {})
            report.paragraph(f"rows: {lay.get('rows')}, columns: {lay.get('cols')}, pages: "
                             f"{', '.join(lay.get('pages') or []) or 'none'}; prompt: {doc['config'].get('prompt', '')}")  # fmt: skip
        for p in pages or [p for p in pngs if "schedule" not in p.name]:
            report.image(rel(p), p.name)
    if doc and doc.get("cells"):
        metrics = metric_names(doc["cells"], doc.get("axes", []))
        if metrics:
            _metric_tables(report, doc, metrics)
            plots = metric_plots(doc, metrics, folder)
            if plots:
                report.heading("Metrics against the axes")
                for p in plots:
                    report.image(rel(p), p.stem.replace("_", " "))
        else:
            report.paragraph(
                "No metrics: the grid had no world base with an oracle, and no CLIP or DINO model."
            )
    logs = training_logs(run_dir)
    if logs:
        report.heading("Training")
        for log in logs:
            plot = training_plot(log, folder, run_dir)
            if plot is not None:
                report.image(rel(plot), f"loss and learning rate: {log.relative_to(run_dir)}")
    schedules = [p for p in run_dir.rglob("*schedule*.png") if FILES not in p.parts]
    drawn = _schedule_from_cells(run_dir, folder) if not schedules and (run_dir / "cells").is_dir() else None
    if schedules or drawn:
        report.heading("K-LoRA selection schedule")
        for p in (schedules or [drawn])[:6]:
            report.image(rel(p), p.name)
    _settings(report, run_dir)
    return report.write(page)


def _has_content(run_dir: Path) -> bool:
    names = ("cells.json", "grid.toml", "record.json", "config.toml")
    return (
        any(run_dir.glob("*.png"))
        or any((run_dir / n).is_file() for n in names)
        or bool(training_logs(run_dir))
        or (run_dir / "cells").is_dir()
    )


def _inside(path: Path, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _settings(report: HtmlReport, run_dir: Path) -> None:
    import html

    for name in ("grid.toml", "record.json", "config.toml"):
        path = run_dir / name
        if path.is_file():
            report.heading(f"Settings ({name})")
            report.parts.append(f"<pre>{html.escape(path.read_text())}</pre>")  # HtmlReport has no <pre> yet
