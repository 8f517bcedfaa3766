"""`run_grid` on the random-weight world pipeline: 2 x 2 axes, 2 steps. Checks the cells (weight 0 is the base
exactly, weight 1 is not), the CSV against the oracle recomputed by hand, resumability (a rerun samples nothing,
a lost cell or a new axis value samples only what is missing), the fusion grid's cross-influence, and that bad
input fails before anything samples."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import lorafuse.eval.grid as grid_mod
from lorafuse.errors import ConfigError, UserInputError
from lorafuse.eval.grid import run_grid
from lorafuse.eval.grid_config import load_grid_config, plan_grid
from lorafuse.eval.metrics import OracleScorer, cross_influence


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def png(folder, row) -> np.ndarray:
    return np.asarray(Image.open(folder / row["image"]).convert("RGB"))


@pytest.fixture
def no_sampling(monkeypatch):
    """Any attempt to sample fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a cell was sampled")

    monkeypatch.setattr(grid_mod, "_sample_cell", refuse)


def test_grid_cells_csv_and_pages(finished_grid, oracle) -> None:
    result = finished_grid
    assert (result.computed, result.reused) == (4, 0)
    rows = read_csv(result.csv)
    assert len(rows) == 4 and all(r["kind"] == "content_only" for r in rows)
    assert {(r["checkpoint"].rsplit("/", 1)[1], r["lora_weight"]) for r in rows} == {
        (f"epoch{e}.safetensors", w) for e in (1, 2) for w in ("0.0", "1.0")
    }
    by = {(r["checkpoint"].rsplit("/", 1)[1], float(r["lora_weight"])): png(result.out, r) for r in rows}
    # weight 0 is the base exactly, whichever LoRA; weight 1 really changes the image
    np.testing.assert_array_equal(by["epoch1.safetensors", 0.0], by["epoch2.safetensors", 0.0])
    assert np.abs(by["epoch1.safetensors", 1.0].astype(int) - by["epoch1.safetensors", 0.0]).mean() > 1

    # scores in the CSV = the oracle on the PNGs, recomputed here
    images = np.stack([png(result.out, r) for r in rows])
    expected = OracleScorer(oracle, individual="teapot_08", style="ink")(images)
    for key in ("oracle_content", "oracle_style", "right_individual", "right_class", "right_style"):
        np.testing.assert_allclose([float(r[key]) for r in rows], expected[key], atol=1e-9)
    c, s = expected["oracle_content"], expected["oracle_style"]
    np.testing.assert_allclose([float(r["oracle_hmean"]) for r in rows], 2 * c * s / (c + s), atol=1e-9)
    assert [r["pred_individual"] for r in rows] == list(expected["pred_individual"])

    doc = json.loads(result.json.read_text())
    assert doc["layout"] == {"rows": "checkpoint", "cols": "lora_weight", "pages": []}
    assert [p.name for p in result.pages] == ["grid_p01.png"] and doc["pages"] == ["grid_p01.png"]
    page = Image.open(result.pages[0])
    assert page.width > 2 * 2 * 64 and page.height > 2 * 2 * 64  # two 2x-upscaled tiles each way, plus labels


def test_rerun_resumes_and_samples_only_missing_cells(finished_grid, world, oracle, no_sampling, monkeypatch,
                                                      tmp_path) -> None:  # fmt: skip
    out = tmp_path / "run"
    shutil.copytree(finished_grid.out, out)
    cfg = dataclasses.replace(load_grid_config(finished_grid.out / "grid.toml"), out=out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.png")}
    again = run_grid(cfg, oracle=oracle, progress=False, pipes={"world-random": world})
    assert (again.computed, again.reused) == (0, 4)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.png")} == mtimes
    assert read_csv(again.csv) == read_csv(finished_grid.csv)

    monkeypatch.undo()  # sampling allowed again, but counted
    calls = []
    real = grid_mod._sample_cell
    monkeypatch.setattr(grid_mod, "_sample_cell", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    index = json.loads((out / "index.json").read_text())
    lost = sorted(index["cells"])[0]
    del index["cells"][lost]  # as if the run had been killed before this cell was recorded
    (out / "index.json").write_text(json.dumps(index))
    third = run_grid(cfg, oracle=oracle, progress=False, pipes={"world-random": world})
    assert (third.computed, third.reused, len(calls)) == (1, 3, 1)

    wider = dataclasses.replace(cfg, axes=dataclasses.replace(cfg.axes, lora_weight=[0.0, 0.5, 1.0]))
    fourth = run_grid(wider, oracle=oracle, progress=False, pipes={"world-random": world})
    assert (fourth.computed, fourth.reused, len(calls)) == (2, 4, 3)
    assert all(c.content_weight == 0.5 for c in calls[1:])
    assert len(read_csv(fourth.csv)) == 6


def test_fusion_grid_cross_influence(world, oracle, write_config, tmp_path) -> None:
    axes = ('checkpoint = ["@epoch1"]\nstyle_checkpoint = ["@style"]\nmethod = ["direct"]\n'
            "style_weight = [0.5, 1.0]\nseed = [0, 1]\nsteps = [2]")  # fmt: skip
    cfg = load_grid_config(write_config(tmp_path, axes))
    plan = plan_grid(cfg)
    # 4 fused cells; content alone once per seed, style alone once per (style weight, seed)
    assert len(plan.cells) == 4 and len(plan.all_cells()) == 4 + 2 + 4
    result = run_grid(cfg, oracle=oracle, progress=False, pipes={"world-random": world})
    assert result.computed == 10
    index = json.loads((result.out / "index.json").read_text())["cells"]
    rows = read_csv(result.csv)
    for row, cell in zip(rows, plan.cells, strict=True):
        alone_c, alone_s = (index[plan.cell_id(c)]["scores"] for c in plan.singles[cell])
        c, s = float(row["oracle_content"]), float(row["oracle_style"])
        hand = 0.5 * ((alone_c["oracle_content"] - c) / alone_c["oracle_content"]
                      + (alone_s["oracle_style"] - s) / alone_s["oracle_style"])  # fmt: skip
        assert float(row["oracle_ci"]) == pytest.approx(hand, abs=1e-12)
        assert float(row["oracle_ci_product"]) == pytest.approx(c * s, abs=1e-12)
        assert float(row["oracle_ci"]) == pytest.approx(
            float(cross_influence(alone_c["oracle_content"], c, alone_s["oracle_style"], s))
        )
    assert json.loads(result.json.read_text())["layout"] == {
        "rows": "seed",
        "cols": "style_weight",
        "pages": [],
    }


def test_pages_split_large_grids(finished_grid, world, oracle, tmp_path) -> None:
    out = tmp_path / "paged"
    shutil.copytree(finished_grid.out, out)
    cfg = load_grid_config(finished_grid.out / "grid.toml")
    cfg = dataclasses.replace(cfg, out=out, layout=dataclasses.replace(cfg.layout, max_rows=1, rows="lora_weight",
                                                                       cols="checkpoint"))  # fmt: skip
    result = run_grid(cfg, oracle=oracle, progress=False, pipes={"world-random": world})
    assert result.computed == 0 and [p.name for p in result.pages] == ["grid_p01.png", "grid_p02.png"]


@pytest.mark.parametrize(
    ("axes", "metrics", "match"),
    [
        ('checkpoint = ["@epoch1"]\nsteps = []', "", "axes.steps has no values"),
        ('checkpoint = ["@epoch1"]\nlora_weight = []', "", "axes.lora_weight has no values"),
        ("steps = [2, 0]", "", "axes.steps: every value must be >= 1"),
        ("guidance = [-1.0]", "", "axes.guidance: every value must be a finite number >= 0"),
        ("seed = [0, 0]", "", "axes.seed lists a value twice"),
        ('checkpoint = ["@epoch1"]\n[axes.options]\nk = []', "", "only for fusion grids"),
        (
            'checkpoint = ["@epoch1"]\nstyle_checkpoint = ["@style"]\n[axes.options]\nk = []',
            "",
            "axes.options.k has no values",
        ),
        (
            'checkpoint = ["@epoch1"]\nstyle_checkpoint = ["@style"]\n[axes.options]\nnope = [1]',
            "",
            "has an option 'nope'",
        ),
        ('checkpoint = ["/no/such.safetensors"]', "", "no such LoRA file"),
        ('style_checkpoint = ["@style"]', "", "needs axes.checkpoint"),
        ('checkpoint = ["@epoch1"]', 'content_references = "missing_refs"', "is not a folder"),
        ('checkpoint = ["@epoch1"]', 'content_references = "mixed"', "have different sizes"),
        ('checkpoint = ["@epoch1"]', 'style_references = "empty"', "holds no images"),
        ('checkpoint = ["@epoch1"]', 'dino = "teapot"', "metrics.dino compares with content references"),
    ],
)
def test_bad_input_fails_before_sampling(axes, metrics, match, write_config, tmp_path, no_sampling) -> None:
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "mixed" / "a.png")
    Image.new("RGB", (32, 64)).save(tmp_path / "mixed" / "b.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match=match):
        run_grid(load_grid_config(write_config(tmp_path, axes, metrics=metrics)), progress=False)
    assert not (tmp_path / "grid_grid" / "cells").exists()


def test_bases_of_different_sizes_need_height_and_width(write_config, tmp_path, no_sampling) -> None:
    big = tmp_path / "big-base"
    for sub, conf in (("unet", {"sample_size": 64}), ("vae", {"block_out_channels": [1, 2, 3, 4]})):
        (big / sub).mkdir(parents=True)
        (big / sub / "config.json").write_text(json.dumps(conf))
    path = write_config(tmp_path, "steps = [1]")
    path.write_text(path.read_text().replace('base = ["world-random"]', f'base = ["world-random", "{big}"]'))
    with pytest.raises(ConfigError, match=r"different sizes \(world-random: 64x64, .*big-base: 512x512\)"):
        run_grid(load_grid_config(path), progress=False)


def test_unknown_key_and_layout_axis_are_config_errors(write_config, tmp_path) -> None:
    path = write_config(tmp_path, "stepz = [1]")
    with pytest.raises(ConfigError, match="unknown key 'axes.stepz'.*did you mean 'steps'"):
        load_grid_config(path)
    path = write_config(tmp_path, "steps = [1, 2]", extra='[layout]\nrows = "epoch"')
    with pytest.raises(ConfigError, match="layout: unknown axis 'epoch'"):
        grid_mod.choose_layout(plan_grid(load_grid_config(path)))


def test_clip_and_dino_scores_match_the_embedders(world, write_config, clip_dir, vit_dir, tmp_path) -> None:
    from lorafuse.eval.embedders import ClipEmbedder, DinoEmbedder
    from lorafuse.eval.metrics import world_references

    metrics = (
        f'oracle = false\nindividual = "teapot_08"\nstyle = "ink"\nclip = "{clip_dir}"\ndino = "{vit_dir}"\n'
    )
    path = write_config(tmp_path, 'checkpoint = ["@epoch1"]\nseed = [0, 1]\nsteps = [1]', metrics=metrics)
    result = run_grid(load_grid_config(path), progress=False, pipes={"world-random": world})
    rows = read_csv(result.csv)
    images = np.stack([png(result.out, r) for r in rows])
    clip, dino = ClipEmbedder.load(clip_dir), DinoEmbedder.load(vit_dir)
    content, style = world_references(individual="teapot_08"), world_references(style="ink")
    expected = {
        "clip_i_content": clip.image_similarity(images, content),
        "clip_i_style": clip.image_similarity(images, style),
        "clip_t": clip.text_similarity(images, "a photo of a teapot, in ink style", triggers=()),
        "dino_content": dino.image_similarity(images, content),
    }
    for key, values in expected.items():
        np.testing.assert_allclose([float(r[key]) for r in rows], values, atol=1e-6, err_msg=key)
    assert "oracle_content" not in rows[0] and "clip_hmean" in rows[0]


def test_changed_metrics_rescore_without_sampling(
    finished_grid, world, oracle, no_sampling, tmp_path
) -> None:
    out = tmp_path / "rescored"
    shutil.copytree(finished_grid.out, out)
    cfg = load_grid_config(finished_grid.out / "grid.toml")
    cfg = dataclasses.replace(cfg, out=out, metrics=dataclasses.replace(cfg.metrics, style=None))
    result = run_grid(cfg, oracle=oracle, progress=False)
    rows = read_csv(result.csv)
    assert result.computed == 0 and "oracle_style" not in rows[0] and "right_style" not in rows[0]
    assert [r["oracle_content"] for r in rows] == [r["oracle_content"] for r in read_csv(finished_grid.csv)]
