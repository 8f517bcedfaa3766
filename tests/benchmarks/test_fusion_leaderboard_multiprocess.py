"""`benchmarks.fusion_leaderboard --num-processes 2`: the LoRAs are trained first in two worker processes, then two
launched CPU processes (gloo) split the pairs and the main process reports; the rows equal a one-process run's, and
a rerun after a pair was lost redoes that pair only (a pair counts once: one result file per pair)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE = ["--pairs", "2", "--seeds", "1", "--steps", "2", "--content-epochs", "1", "--style-epochs", "1",
         "--methods", "direct,switch", "--no-progress"]  # fmt: skip
TIMING = {"seconds_per_image", "plan_s"}


def _leaderboard(work: Path, results: Path, processes: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.pop("LORAFUSE_LEADERBOARD_STARTED", None)
    cmd = [sys.executable, "-m", "benchmarks.fusion_leaderboard", *SMOKE, "--work", str(work), "--results",
           str(results), *(["--num-processes", str(processes)] if processes > 1 else [])]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _rows(work: Path) -> dict[str, list[dict]]:
    out = {}
    for path in sorted((work / "pairs").glob("*/result.json")):
        rows = json.loads(path.read_text())["rows"]
        out[path.parent.name] = [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    return out


@pytest.mark.multiprocess
def test_two_processes_make_the_leaderboard_one_process_makes(tmp_path: Path) -> None:
    one, two, results = tmp_path / "one", tmp_path / "two", tmp_path / "results"
    results.mkdir()
    _leaderboard(one, results, 1)
    out = _leaderboard(two, results, 2)
    assert "trained 4 LoRA(s)" in out  # 2 individuals + 2 styles (the LoCon pair both methods use)
    assert out.count("2 of 2 pairs done (2 computed now, 0 already done)") == 1  # only the main process reports
    assert out.count("] teapot_08+crayon:") == 1 and out.count("] mug_08+blueprint:") == 1  # each pair once
    rows = _rows(two)
    assert rows == _rows(one) and len(rows) == 2
    assert all(len(r) == 6 for r in rows.values())  # base, content only, style only, direct, switch (+ official)
    assert json.loads((results / "fusion_leaderboard_smoke.json").read_text())["config"]["pairs_used"] == ["teapot_08+crayon", "mug_08+blueprint"]
    assert (results / "fusion_leaderboard_smoke_paired.png").stat().st_size > 0

    # As if the process that had mug_08+blueprint was killed before writing it: that pair alone is redone
    (two / "pairs" / "mug_08+blueprint" / "result.json").unlink()
    again = _leaderboard(two, results, 2)
    assert "trained 0 LoRA(s)" in again
    assert "2 of 2 pairs done (1 computed now, 1 already done)" in again
    assert again.count("] mug_08+blueprint:") == 1 and "] teapot_08+crayon:" not in again
    assert _rows(two) == rows
