"""`lorafuse grid`: what `sample` refuses for one cell (more steps than the base's trained timesteps, an image side
its VAE cannot take) is refused for every axis value when the grid is planned, naming the config file and the key,
before the output folder is made or any cell samples."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize(
    ("base", "extra", "expected"),
    [
        # the first cell (2 steps) sampled and the output folder was made before the second failed
        ("world-random", "steps = [2, 5000]", ["axes.steps", "5000 steps for base world-random", "at most 1000"]),
        ("sd15-tiny", "steps = [1001]", ["axes.steps", "1001 steps for base sd15-tiny", "at most 1000"]),
    ],
)
def test_steps_beyond_the_trained_timesteps(cli, tmp_path, base, extra, expected):
    path = tmp_path / "grid.toml"
    path.write_text(f'prompt = "a"\n[axes]\nbase = ["{base}"]\n{extra}\n')
    cli.refused(["grid", path, "--out", tmp_path / "out"], str(path), *expected, watch=tmp_path)


@pytest.mark.parametrize(("size", "expected"), [("height = 66\nwidth = 64", "height 66: base world-random needs a "
                                                 "multiple of 4"), ("height = 64\nwidth = 30", "width 30")])  # fmt: skip
def test_sizes_the_vae_cannot_take(cli, tmp_path, size, expected):
    path = tmp_path / "grid.toml"
    path.write_text(f'prompt = "a"\n{size}\n[axes]\nbase = ["world-random"]\nsteps = [2]\n')
    cli.refused(["grid", path, "--out", tmp_path / "out"], str(path), expected, watch=tmp_path)


def test_base_limits_of_a_folder_are_read_from_its_configs(tmp_path):
    """A diffusers folder says its timesteps and VAE depth in JSON; FLUX's 2x2 patches double the multiple."""
    from lorafuse.eval.grid_config import base_limits

    (tmp_path / "scheduler").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 500}))
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 8, 8, 8]}))
    assert base_limits(str(tmp_path)) == (500, 8)
    (tmp_path / "transformer").mkdir()
    assert base_limits(str(tmp_path)) == (500, 16)
    assert base_limits(str(tmp_path / "nothing-here")) == (None, None)  # unknown: left to the cell's own check
