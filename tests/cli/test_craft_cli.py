"""`lorafuse craft pairs` and `lorafuse craft backbone`, end to end on tiny inputs."""

from __future__ import annotations

import json

from lorafuse.cli.main import main


def test_pairs_then_backbone(tmp_path, capsys) -> None:
    out = tmp_path / "pairs"
    argv = ["craft", "pairs", "--out", str(out), "--content", "teapot_00", "--content", "mug_00",
            "--style", "flat", "--style", "pixel"]  # fmt: skip
    assert main(argv) == 0
    assert (out / "contact_sheet.png").is_file()
    manifest = json.loads((out / "pairs.json").read_text())
    assert len(manifest["pairs"]) == 4 and manifest["styles"] == ["flat", "pixel"]

    config = tmp_path / "backbone.toml"
    config.write_text(
        'pairs = "pairs"\noutput_dir = "run"\nbase = "sd15-tiny"\nsteps = 2\nbatch_size = 2\n'
        'warmup_steps = 1\nr_max = 4\nr_min = 1\nreference_width = 0\nfeatures = "none"\n'
    )
    assert main(["craft", "backbone", str(config), "--set", "steps=1", "--no-progress"]) == 0
    assert (tmp_path / "run" / "backbone" / "model_index.json").is_file()
    assert '"steps": 1' in (tmp_path / "run" / "backbone" / "craft_backbone.json").read_text()


def test_user_errors_exit_2(tmp_path, capsys) -> None:
    assert main(["craft", "pairs", "--out", str(tmp_path), "--style", "no-such-style"]) == 2
    assert "unknown style" in capsys.readouterr().err
    assert main(["craft", "backbone", str(tmp_path / "missing.toml")]) == 2


def test_expert_checks_every_pair_before_training(tmp_path, capsys) -> None:
    base = ["craft", "expert", "--out", str(tmp_path / "e.safetensors"), "--work-dir", str(tmp_path / "w")]
    assert main([*base, "--pair", "teapot_08:crayon", "--pair", "teapot_08"]) == 2
    assert "INDIVIDUAL:STYLE" in capsys.readouterr().err
    assert main([*base, "--pair", "teapot_08:crayon", "--pair", "mug_09:no-such-style"]) == 2
    assert "unknown style" in capsys.readouterr().err
    assert main([*base, "--pair", "teapot_08:crayon", "--grid", "0,x"]) == 2
    assert "--grid" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing trained
