"""`lorafuse report RUN_DIR`: a self-contained HTML page of a run folder (grids, metric tables and plots,
training curves, K-LoRA schedules, settings); see `lorafuse.eval.report`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="write an HTML report of a grid, fuse or training run folder")
    p.add_argument("run_dir", type=Path, help="the run's output folder")
    p.add_argument("--out", type=Path, help="page path (default: RUN_DIR/report.html); PNGs go beside it")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from lorafuse.eval.report import write_report

    print(write_report(args.run_dir, args.out))
    return 0
