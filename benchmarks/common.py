"""Shared by every benchmark: environment record, a printed table, and an atomically written JSON file."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

from lorafuse.utils.atomic import atomic_write_text

RESULTS = Path(__file__).parent / "results"


def environment() -> dict:
    import diffusers
    import peft
    import torch
    import transformers

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        sha, dirty = "unknown", False
    return {
        "git_sha": sha, "git_dirty": dirty, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(), "machine": platform.machine(), "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def print_table(header: list[str], rows: list[list]) -> None:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [header] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for k, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def write_result(name: str, config: dict, figures: dict, folder: Path = RESULTS) -> Path:
    path = Path(folder) / f"{name}.json"
    atomic_write_text(path, json.dumps({"benchmark": name, "config": config, "environment": environment(),
                                        "figures": figures}, indent=1))
    print(f"wrote {path}")
    return path
