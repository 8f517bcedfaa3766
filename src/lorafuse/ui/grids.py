"""Grid configs written by the Fuse and Compare tabs, and their results read back: the page writes a
`lorafuse grid` TOML (the file a CLI user would write), queues `lorafuse grid FILE --report`, and shows the
pages, the scores table (cells.csv), K-LoRA's schedule picture and the HTML report the command wrote."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from lorafuse.errors import UserInputError
from lorafuse.ui.jobs import Job, JobStore
from lorafuse.ui.workspace import BUILTIN_BASES, Workspace, hidden
from lorafuse.utils.atomic import atomic_write_text

SCORE_COLUMNS = ("method", "checkpoint", "lora_weight", "steps", "base", "seed", "oracle_content", "oracle_style",
                 "oracle_hmean", "oracle_individual_acc", "oracle_style_acc")  # fmt: skip


def world_names(ws: Workspace, lora: str) -> dict[str, str]:
    """The world individual / style a LoRA was trained on, read from its run's config and the world dataset's
    info file (empty when it was not trained on a world dataset)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    path = ws.resolve(lora)
    for folder in (path.parent, path.parent.parent):
        config = folder / "config.toml"
        if not config.is_file():
            continue
        # only a hint for the oracle's "auto": a config or info file that cannot be read, or a dataset outside the
        # workspace (a run trained from the command line), gives none, not an error
        try:
            data_dir = tomllib.loads(config.read_text()).get("dataset", {}).get("train_data_dir")
            info = ws.resolve(data_dir) / "world_dataset.json" if isinstance(data_dir, str) and data_dir else None
            if info is not None and info.is_file():
                meta = json.loads(info.read_text())
                return {"individual": meta["individual"]} if meta["kind"] == "subject" else {"style": meta["style"]}
        except (UserInputError, OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}
    return {}


def write_grid(ws: Workspace, folder: str, name: str, *, prompt: str, axes: dict[str, Any],
               metrics: dict[str, Any], scheduler: str = "ddim") -> tuple[str, str]:  # fmt: skip
    """Write FOLDER/NAME.toml (LoRA paths relative to it, so it travels with the workspace); returns
    (config, output folder), both workspace-relative."""
    if not prompt.strip():
        raise UserInputError("prompt: write a prompt first")
    config = ws.resolve(f"{folder}/{name}.toml")
    out = ws.resolve(f"{folder}/{name}")
    for key in ("checkpoint", "style_checkpoint"):
        if axes.get(key):
            axes[key] = [os.path.relpath(ws.root / ws.input_file(p, key), config.parent) for p in axes[key]]
    # a base is a built-in name or a path in the workspace (relative to the config, as the LoRAs)
    axes["base"] = [b if b in BUILTIN_BASES else os.path.relpath(ws.root / ws.base_model(b), config.parent)
                    for b in axes.get("base") or ["world"]]  # fmt: skip
    doc = {"prompt": prompt, "scheduler": scheduler, "out": name, "allow_pickle": ws.allow_pickle, "axes": axes,
           "metrics": {k: v for k, v in metrics.items() if v not in (None, "")}}  # fmt: skip
    atomic_write_text(config, tomli_w.dumps(doc))
    return ws.relative(config), ws.relative(out)


def queue_grid(ws: Workspace, store: JobStore, kind: str, folder: str, title: str, *, prompt: str,
               axes: dict[str, Any], metrics: dict[str, Any], inputs: list[str], scheduler: str = "ddim") -> Job:  # fmt: skip
    """A grid of the page's form, under a fresh name KIND-<time> in FOLDER (fuse/ or grids/), queued once `lorafuse grid`'s
    own checks of the file pass (in the helper process), so a bad form is refused on the page, not as a failed
    job; a refused config and its claimed folder are removed again."""
    from lorafuse.ui import tasks
    from lorafuse.ui.helper import HELPER

    name = claim_name(ws, folder, kind)
    try:
        config, out = write_grid(ws, folder, name, prompt=prompt, axes=axes, metrics=metrics, scheduler=scheduler)
        HELPER.call(tasks.check_grid_config, config, str(ws.root))
    except UserInputError:
        ws.resolve(f"{folder}/{name}.toml").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            ws.resolve(f"{folder}/{name}").rmdir()
        raise
    return submit_grid(ws, store, kind, title, config, out, inputs)


def claim_name(ws: Workspace, folder: str, prefix: str) -> str:
    """A new NAME for FOLDER/NAME.toml and its output FOLDER/NAME/, claimed by making that folder (mkdir fails if
    it exists): names are stamped to the second, and a double click queued two jobs sharing one config and
    output folder, the second rewriting the first's config while it waited."""
    stamp = time.strftime(f"{prefix}-%Y%m%d-%H%M%S")
    for k in range(1, 1000):
        name = stamp if k == 1 else f"{stamp}-{k}"
        try:
            ws.resolve(f"{folder}/{name}").mkdir(parents=True)
        except FileExistsError:
            continue
        return name
    raise UserInputError(f"{folder}/{stamp}: 999 grids this second already; try again")


def submit_grid(ws: Workspace, store: JobStore, kind: str, title: str, config: str, out: str,
                inputs: list[str] = ()) -> Job:  # fmt: skip
    """Queue `lorafuse grid CONFIG --report`; `inputs` (LoRAs, base folders) are checked again when it starts."""
    argv = ["grid", config, "--report"]
    job = store.submit(kind, title, argv, {"dir": out, "config": config},
                       inputs=[p for p in inputs if p not in BUILTIN_BASES])  # fmt: skip
    store.ensure_worker()
    return job


def results(ws: Workspace, out: str) -> dict[str, Any]:
    """What a finished (or partly finished) grid folder holds."""
    folder = ws.resolve(out)
    pages = sorted(p for p in folder.glob("grid_p*.png") if not hidden(p))
    table: list[list[Any]] = []
    header: list[str] = []
    csv_path = folder / "cells.csv"
    if csv_path.is_file():
        with open(csv_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        present = [c for c in SCORE_COLUMNS if rows and c in rows[0]]
        extra = [c for c in (rows[0] if rows else {}) if c.startswith("oracle_") and c not in present]
        header = present + extra
        table = [[_short(r.get(c, "")) for c in header] for r in rows if r.get("kind", "fused") != "single"]
    schedules = sorted(p for p in folder.rglob("*schedule*.png") if not hidden(p, folder))
    report = folder / "report.html"
    return {"pages": pages, "header": header, "table": table, "schedule": schedules[0] if schedules else None,
            "report": report if report.is_file() else None}  # fmt: skip


def _short(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return Path(value).name if "/" in value else value
    return f"{number:.3f}" if not number.is_integer() else str(int(number))


def report_link(ws: Workspace, report: Path | None) -> str:
    """A link that opens the report in a new tab, through gradio's file route (the workspace is its only
    allowed folder, and the login applies)."""
    if report is None:
        return ""
    return f'<a href="/gradio_api/file={report}" target="_blank" class="report-link">open {ws.relative(report)}</a>'
