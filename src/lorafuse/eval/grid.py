"""`lorafuse grid`: sample every cell of a product of axes, score it, and write labelled grids, a CSV and JSON.

    result = run_grid(load_grid_config("grid.toml"))
    result.rows          # one dict per grid cell: its axis values, image path and scores

Run folder (resumable: rerunning keeps every cell already done, so an interrupted grid continues, and a grid
with one more axis value samples only the new cells):
    cells/<id>.png       one image per cell; <id> hashes everything that decides the image (grid_config.Cell)
    cells/<id>.json      the cell's full record (sampling settings, fusion plan, K-LoRA schedule)
    index.json           the done-index: id -> settings, scores; rewritten atomically after every cell
                         (index.rank<r>.json per process while several processes sample; folded in after)
    grid_pNN.png         labelled grids (rows x cols axes; other axes and overflow go to more pages)
    cells.csv, cells.json, grid.toml (the config as run, paths resolved)
A cell's PNG is written before the index names it, so an interrupted write never counts as done.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorafuse.config.toml_io import config_to_dict, save_config
from lorafuse.errors import ConfigError, UserInputError
from lorafuse.eval.grid_config import AXIS_ORDER, Cell, GridConfig, GridPlan, plan_grid
from lorafuse.eval.measures import derived
from lorafuse.eval.scoring import GridScorer
from lorafuse.utils.atomic import atomic_write_text
from lorafuse.utils.images import labelled_grid, save_image, to_uint8
from lorafuse.utils.launch import process_state

ADAPTER = "grid_lora"
COL_PREF = ("lora_weight", "style_weight", "steps", "guidance", "seed")
ROW_PREF = ("checkpoint", "method", "base", "style_checkpoint")
SHORT = {"lora_weight": "w", "style_weight": "w_s", "guidance": "g"}


@dataclass
class GridResult:
    out: Path
    computed: int  # cells sampled by this run
    reused: int  # cells found done in the run folder
    rows: list[dict[str, Any]]
    pages: list[Path]
    csv: Path
    json: Path
    main: bool = True  # False in the other processes of a multi-process run (their rows are the main one's)


class CellStore:
    """The run folder's done-index. In a run of several processes each writes its own shard
    (`index.rank<r>.json`), and the next reader (the main process when they all finish, or any later run, also
    after a process was killed) folds the shards into index.json: cells are keyed by id, so a cell is never
    counted twice, and a cell a killed process did not record is simply still to do."""

    def __init__(self, out: Path, rank: int | None = None):
        self.out = out
        self.index_path = out / "index.json"
        self.shard_path = self.index_path if rank is None else out / f"index.rank{rank}.json"
        self.index: dict[str, dict[str, Any]] = {}
        for path in [self.index_path, *self._shards()]:
            if path.is_file():
                self.index.update(self._read(path))

    def _shards(self) -> list[Path]:
        return sorted(self.out.glob("index.rank*.json"))

    @staticmethod
    def _read(path: Path) -> dict[str, dict[str, Any]]:
        try:
            return json.loads(path.read_text())["cells"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserInputError(f"{path}: not a grid index ({e}); use a new output folder") from None

    def png(self, cid: str) -> Path:
        return self.out / "cells" / f"{cid}.png"

    def done(self, cid: str) -> bool:
        return cid in self.index and self.png(cid).is_file()

    def add(self, cid: str, cell: Cell, image: np.ndarray, record: dict[str, Any]) -> None:
        from PIL import Image

        save_image(Image.fromarray(image), self.png(cid))
        atomic_write_text(self.out / "cells" / f"{cid}.json", json.dumps(record, indent=1, default=str))
        self.index[cid] = {"settings": cell.settings(), "image": f"cells/{cid}.png"}
        self._write(self.shard_path)

    def image(self, cid: str) -> np.ndarray:
        from PIL import Image

        return np.asarray(Image.open(self.png(cid)).convert("RGB"))

    def save(self) -> None:
        """index.json with every shard folded in; the shards go once index.json holds them."""
        for path in self._shards():
            for cid, entry in self._read(path).items():
                self.index.setdefault(cid, entry)
        self._write(self.index_path)
        for path in self._shards():
            path.unlink()

    def _write(self, path: Path) -> None:
        atomic_write_text(path, json.dumps({"version": 1, "cells": self.index}, indent=1))


# --- sampling ---------------------------------------------------------------------------------------------------


def _load_states(pipe: Any, cells: list[Cell], cfg: GridConfig) -> dict[str, Any]:
    """Every LoRA this base's cells use, read and checked against the base before any of them samples."""
    from lorafuse.lora.inject import pipeline_arch
    from lorafuse.lora.io import load_lora
    from lorafuse.lora.validate import validate_lora

    arch = pipeline_arch(pipe)
    states = {}
    for path in dict.fromkeys(p for c in cells for p in (c.content, c.style) if p):
        state = load_lora(path, allow_pickle=cfg.allow_pickle, base=pipe)
        validate_lora(state, pipe, arch=arch)  # raises naming the file when it does not fit this base
        states[path] = state
    return states


def _sample_cell(pipe: Any, cell: Cell, states: dict[str, Any], cfg: GridConfig) -> tuple[np.ndarray, dict]:
    """One image (H, W, 3) uint8 and its record. Fused cells go through `lorafuse.fuse`; a single LoRA is
    injected at its weight for this one sample and removed again, so the base stays clean for the next cell."""
    common = dict(negative_prompt=cfg.negative_prompt, steps=cell.steps, guidance=cell.guidance, seed=cell.seed,
                  scheduler=cfg.scheduler, height=cfg.height, width=cfg.width, progress=False)  # fmt: skip
    if cell.method is not None:
        from lorafuse.fusion.api import fuse

        result = fuse(states[cell.content], states[cell.style], method=cell.method, prompt=cfg.prompt, base=pipe,
                      content_weight=cell.content_weight, style_weight=cell.style_weight, **common, **dict(cell.options))  # fmt: skip
        return result.uint8()[0], result.record
    from lorafuse.fusion.sampling import sample
    from lorafuse.lora.inject import delete_adapter, inject_lora

    lora = cell.content or cell.style
    if lora:
        inject_lora(pipe, states[lora], ADAPTER, cell.content_weight if cell.content else cell.style_weight)
    try:
        result = sample(pipe, cfg.prompt, **common, output="np")
    finally:
        if lora:
            delete_adapter(pipe, ADAPTER)
    image = to_uint8(result.images[0])
    return image, {"kind": cell.kind, "settings": cell.settings(), "sampling": result.settings}


def _sample_missing(
    plan: GridPlan, store: CellStore, progress: bool, pipes: Mapping[str, Any], state: Any = None,
    opened: Callable[[], None] = lambda: None,
) -> tuple[int, int]:  # fmt: skip
    """Sample the cells not done yet; with `state` (several processes) each samples its contiguous share of them
    (`split_between_processes`, so a process loads few bases). Returns (cells to do, cells already done).
    `opened` makes the output folder: called once the first base and its LoRAs passed their checks, so a LoRA
    that does not fit leaves no folder and no progress bar in front of its error."""
    from tqdm.auto import tqdm

    from lorafuse.models.load import load_base_pipeline

    cells = list({plan.cell_id(c): c for c in plan.all_cells()}.items())
    todo = [(cid, c) for cid, c in cells if not store.done(cid)]
    mine = todo
    if state is not None:
        state.wait_for_everyone()  # every process has read the same done-index before any process writes
        with state.split_between_processes(todo) as share:
            mine = list(share)
    bar = None
    for base, group in itertools.groupby(mine, key=lambda item: item[1].base):
        group = list(group)
        # a base loads only here, and only when it has cells left to do (a finished grid reruns in seconds)
        pipe = pipes[base] if base in pipes else load_base_pipeline(base, device=plan.cfg.device, dtype=plan.cfg.dtype)
        states = _load_states(pipe, [c for _, c in group], plan.cfg)
        if bar is None:
            opened()
            bar = tqdm(total=len(mine), desc="grid cells", disable=not progress)
        for cid, cell in group:
            image, record = _sample_cell(pipe, cell, states, plan.cfg)
            store.add(cid, cell, image, record)
            bar.update(1)
        del pipe, states
    if bar is None:
        opened()
    else:
        bar.close()
    return len(todo), len(cells) - len(todo)


def _score_missing(plan: GridPlan, store: CellStore, scorer: GridScorer, batch: int = 32) -> None:
    """Score cells without scores from this scorer (new cells, or the metrics config changed): from the PNGs,
    so scores never depend on whether a cell was sampled in this run."""
    ids = [cid for cid in dict.fromkeys(plan.cell_id(c) for c in plan.all_cells())
           if store.index[cid].get("metrics") != scorer.signature]  # fmt: skip
    for i in range(0, len(ids), batch):
        chunk = ids[i : i + batch]
        if scorer.active:
            images = np.stack([store.image(cid) for cid in chunk])
            scores = scorer.score(images, [store.index[cid]["settings"]["base"] for cid in chunk])
        else:
            scores = [{} for _ in chunk]
        for cid, s in zip(chunk, scores, strict=True):
            store.index[cid].update(scores=s, metrics=scorer.signature)
        store.save()


# --- tables and pages -------------------------------------------------------------------------------------------


def _rows(plan: GridPlan, store: CellStore) -> list[dict[str, Any]]:
    rows = []
    for coords, cell in zip(plan.coords, plan.cells, strict=True):
        cid = plan.cell_id(cell)
        scores = dict(store.index[cid].get("scores", {}))
        alone = [store.index[plan.cell_id(c)].get("scores", {}) for c in plan.singles.get(cell, ())]
        if cell.method is not None:
            scores.update(derived(scores, *(alone or [{}, {}])))
        else:
            scores.update(derived(scores))
        rows.append({"cell": cid, "image": f"cells/{cid}.png", "kind": cell.kind, **coords, **scores})
    return rows


def choose_layout(plan: GridPlan) -> tuple[str | None, str | None, list[str]]:
    """(rows axis, cols axis, page axes). Defaults follow the character-style-transfer paper's figures (Chu): checkpoints down, weights across."""
    lay = plan.cfg.layout
    axes = list(plan.coords[0])
    for name in (lay.rows, lay.cols):
        if name is not None and name not in axes:
            raise ConfigError(f"layout: unknown axis {name!r}; the axes are {', '.join(axes)}")
    varying = list(plan.varying)
    options = [a for a in varying if a.startswith("option.")]
    cols = lay.cols or next(
        (a for a in (*COL_PREF, *options, *varying) if a in varying and a != lay.rows), None
    )
    rows = lay.rows or next((a for a in (*ROW_PREF, *options, *varying) if a in varying and a != cols), None)
    pages = [a for a in varying if a not in (rows, cols)]
    return rows, cols, pages


def _label(axis: str | None, value: Any) -> str:
    if axis is None:
        return ""
    if axis in ("checkpoint", "style_checkpoint", "base"):
        return Path(str(value)).stem if value is not None else "none"
    name = SHORT.get(axis, axis.removeprefix("option."))
    return f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"


def _pages(plan: GridPlan, store: CellStore, out: Path) -> list[Path]:
    rows_axis, cols_axis, page_axes = choose_layout(plan)
    lay = plan.cfg.layout

    def values(axis: str | None, idx: list[int]) -> list[Any]:
        return list(dict.fromkeys(plan.coords[i][axis] for i in idx)) if axis else [None]

    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(plan.coords):
        groups.setdefault(tuple(c[a] for a in page_axes), []).append(i)
    paths = []
    for key, idx in groups.items():
        row_vals, col_vals = values(rows_axis, idx), values(cols_axis, idx)
        at = {(plan.coords[i][rows_axis] if rows_axis else None, plan.coords[i][cols_axis] if cols_axis else None): i
              for i in idx}  # fmt: skip
        for r0 in range(0, len(row_vals), lay.max_rows):
            for c0 in range(0, len(col_vals), lay.max_cols):
                rv, cv = row_vals[r0 : r0 + lay.max_rows], col_vals[c0 : c0 + lay.max_cols]
                tiles = [[store.image(plan.cell_id(plan.cells[at[(r, c)]])) for c in cv] for r in rv]
                scale = lay.scale or (2 if max(tiles[0][0].shape[:2]) <= 128 else 1)
                title = (
                    ", ".join(_label(a, v) for a, v in zip(page_axes, key, strict=True)) or plan.cfg.prompt
                )
                img = labelled_grid(tiles, [_label(rows_axis, r) for r in rv], [_label(cols_axis, c) for c in cv],
                                    scale=scale, title=title[:120])  # fmt: skip
                paths.append(save_image(img, out / f"grid_p{len(paths) + 1:02d}.png"))
    return paths


def _write_tables(
    plan: GridPlan, rows: list[dict[str, Any]], pages: list[Path], out: Path
) -> tuple[Path, Path]:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "cells.csv", buf.getvalue())
    rows_axis, cols_axis, page_axes = choose_layout(plan)
    doc = {"config": config_to_dict(plan.cfg), "axes": [a for a in plan.coords[0]], "varying": plan.varying,
           "layout": {"rows": rows_axis, "cols": cols_axis, "pages": page_axes},
           "pages": [p.name for p in pages], "cells": rows}  # fmt: skip
    atomic_write_text(out / "cells.json", json.dumps(doc, indent=1, default=str))
    return out / "cells.csv", out / "cells.json"


def run_grid(cfg: GridConfig, *, oracle: Any = None, progress: bool = True,
             pipes: Mapping[str, Any] | None = None) -> GridResult:  # fmt: skip
    """Check everything, sample the cells not yet done, score, and write pages and tables to `cfg.out`.

    oracle: an `Oracle` to use instead of the installed one (tests build one with random weights).
    pipes: already loaded pipelines by base name (a notebook's, a test's); they are left as they came."""
    # 1. Check inputs, before any sampling: axes, files, methods and options, sizes, references, metric models
    if cfg.out is None:
        raise ConfigError("no output folder: set `out` in the config or pass --out")
    plan = plan_grid(cfg)
    bases = list(dict.fromkeys(c.base for c in plan.cells))
    scorer = GridScorer(cfg.metrics, bases, cfg.prompt, oracle=oracle)
    out = Path(cfg.out)
    state = process_state()  # several processes under `accelerate launch` (lorafuse grid --num-processes N)
    store = CellStore(out, rank=None if state is None else state.process_index)

    def open_out() -> None:
        out.mkdir(parents=True, exist_ok=True)
        if state is None or state.is_main_process:
            save_config(cfg, out / "grid.toml")

    # 2. Sample what is missing (each process its share), 3. score what is unscored, 4. pages and tables
    computed, reused = _sample_missing(plan, store, progress, pipes or {}, state, open_out)
    if state is not None:
        state.wait_for_everyone()
        if not state.is_main_process:  # the main process folds the shards in, scores and writes the pages
            return GridResult(out, computed, reused, [], [], out / "cells.csv", out / "cells.json", main=False)
        store = CellStore(out)
    store.save()
    _score_missing(plan, store, scorer)
    rows = _rows(plan, store)
    pages = _pages(plan, store, out)
    csv_path, json_path = _write_tables(plan, rows, pages, out)
    return GridResult(out, computed, reused, rows, pages, csv_path, json_path)


__all__ = ["AXIS_ORDER", "CellStore", "GridResult", "choose_layout", "run_grid"]
