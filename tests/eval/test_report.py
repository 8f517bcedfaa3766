"""`write_report` and the `lorafuse grid` / `lorafuse report` commands: the page holds the grid images, the
metric tables, the plots, the training curves and K-LoRA schedule of the run folder, and every image it names
exists beside it."""

from __future__ import annotations

import csv
import re
import shutil

import pytest

from lorafuse.cli.main import main
from lorafuse.eval.report import write_report


def referenced_images(page):
    return re.findall(r'<img src="([^"]+)"', page.read_text())


def test_report_has_grids_tables_plots_and_training(finished_grid, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_grid.out, run)
    (run / "logs").mkdir()
    with open(run / "logs" / "mylora.csv", "w", newline="") as fh:  # the trainer's RunLog columns
        w = csv.writer(fh)
        w.writerow(["step", "epoch", "loss", "loss_avg", "lr_unet", "lr_text_encoder", "seconds"])
        for step in range(1, 11):
            w.writerow([step, 1 + step // 6, 0.2 / step, 0.15, 1e-4 * step / 10, 5e-5, 0.1])
    shutil.copyfile(finished_grid.pages[0], run / "klora_schedule.png")  # stands in for a real heat map

    page = write_report(run)
    html = page.read_text()
    images = referenced_images(page)
    assert "grid_p01.png" in images
    assert "report_files/metrics_vs_lora_weight.png" in images
    assert "report_files/metrics_vs_checkpoint.png" in images  # the epoch axis
    assert "report_files/training_logs_mylora.png" in images
    assert "klora_schedule.png" in images
    for src in images:
        assert (page.parent / src).is_file(), src
    # the tables: summary per (checkpoint, weight) and every cell, with the oracle columns
    assert (
        "<h2>Metrics</h2>" in html
        and "<th>oracle_content</th>" in html
        and "<th>right_individual</th>" in html
    )
    for cell in (r["cell"] for r in finished_grid.rows):
        assert f"<td>{cell}</td>" in html
    assert "<td>epoch1</td>" in html and "<td>epoch2</td>" in html
    assert "Settings (grid.toml)" in html and "teapot_08" in html


def test_report_of_a_folder_without_grid(tmp_path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "grid.png")  # e.g. `lorafuse fuse` output
    page = write_report(tmp_path)
    assert referenced_images(page) == ["grid.png"] and "Metrics" not in page.read_text()


def test_report_cli_errors_in_one_line(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "not a folder" in err and "Traceback" not in err


def test_grid_cli_runs_and_reports(write_config, tmp_path, capsys) -> None:
    path = write_config(tmp_path, "steps = [1]\nseed = [0, 1]", metrics="")
    out = tmp_path / "out"
    code = main(
        ["grid", str(path), "--out", str(out), "--set", "metrics.oracle=false", "--no-progress", "--report"]
    )
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "2 cells (2 sampled now, 0 already done)" in printed
    assert (out / "report.html").is_file() and (out / "grid_p01.png").is_file()
    rows = list(csv.DictReader(open(out / "cells.csv")))
    assert [r["seed"] for r in rows] == ["0", "1"] and all(r["kind"] == "base" for r in rows)

    assert main(["grid", str(path), "--set", "axes.steps=[]"]) == 2
    assert "axes.steps has no values" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["nonsense", "axes.steps"])
def test_grid_cli_bad_override(bad, write_config, tmp_path, capsys) -> None:
    path = write_config(tmp_path, "steps = [1]")
    assert main(["grid", str(path), "--set", bad]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
