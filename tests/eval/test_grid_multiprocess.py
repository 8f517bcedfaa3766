"""`lorafuse grid --num-processes 2`: two CPU processes (gloo) split the cells, the main process folds their
done-index shards in and scores; the result equals a one-process run's, and a run whose process was killed
redoes only the cells nobody recorded."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

AXES = 'checkpoint = ["@epoch1", "@epoch2"]\nlora_weight = [0.0, 1.0]\nsteps = [2]\nseed = [7]'


def _grid(config, out, processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "lorafuse", "grid", str(config), "--out", str(out), "--no-progress"]
    if processes > 1:
        cmd += ["--num-processes", str(processes)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _rows(out) -> dict[str, dict]:
    with open(out / "cells.csv", newline="") as fh:
        return {r["image"]: r for r in csv.DictReader(fh)}


def _pixels(out, row) -> np.ndarray:
    return np.asarray(Image.open(out / row["image"]).convert("RGB"))


@pytest.mark.multiprocess
def test_two_processes_make_the_grid_one_process_makes(write_config, tmp_path):
    config = write_config(tmp_path / "cfg", AXES)
    one, two = tmp_path / "one", tmp_path / "two"
    _grid(config, one, 1)
    proc = _grid(config, two, 2)
    assert "4 cells (4 sampled now, 0 already done)" in proc.stdout
    assert proc.stdout.count(" cells (") == 1  # only the main process reports
    rows_one, rows_two = _rows(one), _rows(two)
    assert rows_one.keys() == rows_two.keys() and len(rows_two) == 4
    for image, row in rows_two.items():
        np.testing.assert_array_equal(_pixels(two, row), _pixels(one, rows_one[image]))
        assert row["oracle_content"] == rows_one[image]["oracle_content"]
    assert not list(two.glob("index.rank*.json"))  # the shards were folded into index.json
    assert len(json.loads((two / "index.json").read_text())["cells"]) == 4

    # As if process 1 had been killed after recording one of its two cells: only its shard holds that cell,
    # the other cell has no entry (its PNG may exist, half-done work does not count).
    index = json.loads((two / "index.json").read_text())["cells"]
    ids = sorted(index)
    (two / "index.json").unlink()
    (two / "index.rank0.json").write_text(json.dumps({"version": 1, "cells": {k: index[k] for k in ids[:2]}}))
    (two / "index.rank1.json").write_text(json.dumps({"version": 1, "cells": {ids[2]: index[ids[2]]}}))
    again = _grid(config, two, 2)
    assert "4 cells (1 sampled now, 3 already done)" in again.stdout
    assert _rows(two).keys() == rows_one.keys()
    assert sorted(json.loads((two / "index.json").read_text())["cells"]) == ids
    assert not list(two.glob("index.rank*.json"))
