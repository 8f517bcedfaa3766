"""`lorafuse fuse` on kohya files for the random-weight world base: images, grid, heat map and JSON record;
`--method all`, `--set`, `--config`, and errors that exit with status 2 and one line."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lorafuse.cli.main import main
from lorafuse.fusion.registry import method_names
from lorafuse.fusion.synthetic import random_lora
from lorafuse.lora.io import save_lora
from lorafuse.models.load import load_base_pipeline
from lorafuse.models.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-loras")
    world = load_base_pipeline("world-random")
    content = save_lora(
        random_lora(world, seed=1, rank=(2, 4), scale=0.3), tmp / "dog.safetensors", arch="world", base=world
    )
    style = save_lora(
        random_lora(world, seed=2, rank=4, scale=0.25), tmp / "ink.safetensors", arch="world", base=world
    )
    sd15 = tiny_pipeline("sd15", 0)
    other = save_lora(random_lora(sd15, seed=3), tmp / "sd15.safetensors", arch="sd15", base=sd15)
    return content, style, other


def fuse(files, out, *extra: str) -> int:
    content, style, _ = files
    argv = ["fuse", "--content", str(content), "--style", str(style), "--prompt", "a red car", "--out", str(out),
            "--base", "world-random", "--steps", "3", "--no-progress", *extra]  # fmt: skip
    return main(argv)


def test_one_method_writes_images_grid_heatmap_and_record(files, tmp_path) -> None:
    assert fuse(files, tmp_path, "--method", "klora", "--num-images", "2", "--set", "selection=random",
                "--set", "random_p=0.5") == 0  # fmt: skip
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["method"] == "klora" and record["base"] == "world-random"
    assert record["options"]["selection"] == "random" and record["options"]["random_p"] == 0.5
    assert record["sampling"]["seeds"] == [0, 1] and record["loras"][1]["source"].endswith("ink.safetensors")
    for name in ("klora_00.png", "klora_01.png", "grid.png", "klora_schedule.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG"
    with Image.open(tmp_path / "klora_00.png") as img:
        assert img.size == (64, 64)


def test_method_all_side_by_side(files, tmp_path, capsys) -> None:
    config = tmp_path / "methods.toml"
    config.write_text('[switch]\ntau = 1\n\n[klora]\nselection = "fixed"\n')
    extra = ("--method", "all", "--config", str(config), "--set", "content_weight=0.8")
    assert fuse(files, tmp_path / "out", *extra) == 0
    record = json.loads((tmp_path / "out" / "record.json").read_text())
    ran, skipped = set(record["methods"]), set(record["skipped"])
    assert ran | skipped == set(method_names()) and {"direct", "klora", "switch", "composite"} <= ran
    assert record["methods"]["switch"]["options"]["tau"] == 1
    assert record["methods"]["klora"]["options"]["selection"] == "fixed"
    assert all(r["options"]["content_weight"] == 0.8 for r in record["methods"].values())
    with Image.open(tmp_path / "out" / "grid.png") as grid:
        assert grid.size[1] > len(ran) * 64  # one row per method, upscaled tiles
    for method in ran:
        assert (tmp_path / "out" / f"{method}_00.png").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "bogus=1"], "unknown key 'bogus'"),
        (["--set", "selection"], "expected OPTION=VALUE"),
        (["--method", "all", "--set", "bogus=1"], "no fusion method has such an option"),
        (["--method", "nope"], "unknown fusion method 'nope'"),
        (["--set", "alpha=-2"], "klora: option alpha=-2.0 must be"),
    ],
)
def test_option_errors(files, tmp_path, capsys, extra, message) -> None:
    assert fuse(files, tmp_path, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "record.json").exists()


def test_lora_for_another_base_names_the_file(files, tmp_path, capsys) -> None:
    content, _, other = files
    argv = ["fuse", "--content", str(content), "--style", str(other), "--prompt", "x", "--out", str(tmp_path),
            "--base", "world-random", "--steps", "2", "--method", "direct", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "direct: style LoRA" in err and "sd15.safetensors" in err
