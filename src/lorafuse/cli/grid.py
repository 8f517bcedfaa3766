"""`lorafuse grid CONFIG.toml`: sample and score a grid over LoRA weight, checkpoint, steps, guidance, base,
fusion method, method options and seed (see `lorafuse.eval.grid_config` for the file). Rerunning continues: cells
already in the output folder are kept."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path

from lorafuse.cli.options import add_num_processes_argument, parse_sets
from lorafuse.errors import ConfigError, UserInputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("grid", help="sample and score a grid of settings (resumable)")
    p.add_argument("config", type=Path, help="grid TOML file")
    p.add_argument("--out", type=Path, help="output folder (default: the config's `out`, else <config>_grid)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. axes.steps=[10,20] or metrics.clip=/models/clip; repeatable",
    )
    p.add_argument("--report", action="store_true", help="also write report.html into the output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_num_processes_argument(p, "sample the cells in N processes", "the main process scores and writes the pages")
    p.set_defaults(func=cmd_grid)


def cmd_grid(args: argparse.Namespace) -> int:
    from lorafuse.eval.grid import run_grid
    from lorafuse.eval.grid_config import load_grid_config

    cfg = load_grid_config(args.config, parse_sets(args.set, "axes.steps=[10,20]") or None)
    if args.out is not None:
        cfg = dataclasses.replace(cfg, out=args.out)
    from lorafuse.utils.atomic import check_output

    if cfg.out is not None:  # before any model loads
        with _naming_the_config(args.config):  # sizing the output plans the grid, whose checks name only the key
            estimate = estimate_output_bytes(cfg)
        check_output(cfg.out, kind="folder", what="grid output folder", estimate=estimate)
    from lorafuse.utils.launch import in_launched_process, relaunch

    if args.num_processes < 1:
        raise UserInputError(f"--num-processes {args.num_processes}: give 1 or more")
    if args.num_processes > 1 and not in_launched_process():
        return relaunch(args.num_processes, _grid_words(args))
    with _naming_the_config(args.config):
        result = run_grid(cfg, progress=not args.no_progress)
    if not result.main:
        return 0
    print(
        f"{len(result.rows)} cells ({result.computed} sampled now, {result.reused} already done); "
        f"{len(result.pages)} grid page(s), {result.csv.name} and {result.json.name} in {result.out}"
    )
    if args.report:
        from lorafuse.eval.report import write_report

        print(write_report(result.out))
    return 0


@contextlib.contextmanager
def _naming_the_config(config: Path):
    """The plan's checks name the key; the user also needs to know which file."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(str(e) if str(config) in str(e) else f"{config}: {e}") from None


# a cell's row in index.json, cells.json and cells.csv beyond its settings: image path, kind, scores
_ROW_EXTRA = 1 << 10
# a plain (unfused) cell's record beyond its settings: the sampling settings
_SAMPLING_RECORD = 4 << 10


def estimate_output_bytes(cfg) -> int:
    """An upper bound of what the grid writes into its folder, from the config alone (before any base loads):
    each cell not done yet (its PNG and record), the pages (every cell's tile with a full label margin: no page
    layout needs more), the tables (a row per cell in three of them) and the config."""
    from lorafuse.cli.fuse import record_bytes
    from lorafuse.config.toml_io import config_to_dict
    from lorafuse.eval.grid import CellStore, _label
    from lorafuse.eval.grid_config import plan_grid
    from lorafuse.models.meta import sample_side
    from lorafuse.utils.atomic import png_bytes
    from lorafuse.utils.images import grid_size

    plan = plan_grid(cfg)
    store = CellStore(Path(cfg.out)) if Path(cfg.out).is_dir() else None
    sizes = {b: (w, h) if h else (sample_side(b),) * 2 for b, (h, w) in plan.sizes.items()}
    total = 0
    for cell in plan.all_cells():
        settings = len(json.dumps(cell.settings(), default=str))
        total += 3 * (settings + _ROW_EXTRA)
        if store is not None and store.done(plan.cell_id(cell)):
            continue
        fused = record_bytes(cell.method, Path(cell.content), Path(cell.style), cell.steps) if cell.method else 0
        total += png_bytes(*sizes[cell.base]) + settings + (fused or _SAMPLING_RECORD)
    labels = [_label(a, v) for c in plan.coords for a, v in c.items()]
    scale = cfg.layout.scale or 2  # `_pages` scales tiles of up to 128 pixels by 2, larger ones by 1
    for cell in plan.cells:
        total += png_bytes(*grid_size(1, 1, sizes[cell.base], labels, scale, title="t"))
    return total + len(json.dumps(config_to_dict(cfg), default=str))


def _grid_words(args: argparse.Namespace) -> list[str]:
    """This command's words for the launched processes (without --num-processes)."""
    words = ["grid", str(args.config), *(w for item in args.set for w in ("--set", item))]
    if args.out is not None:
        words += ["--out", str(args.out)]
    return words + ["--report"] * args.report + ["--no-progress"] * args.no_progress
