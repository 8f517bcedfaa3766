"""`lorafuse train`: every config field is a documented flag, overrides reach the right keys, the examples load,
and a run from the command line writes a LoRA; user errors are one line with exit status 2."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lorafuse.cli.main import build_parser, main
from lorafuse.cli.train import collect_overrides, options
from lorafuse.lora.io import load_lora
from lorafuse.train.config import load_train_config
from lorafuse.world.dataset import write_style_dataset, write_subject_dataset

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _help_text(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare with single spaces


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


def test_every_field_has_documentation():
    undocumented = [o.key for o in options() if len(o.doc) < 10]
    assert not undocumented, f"add a comment beside these fields in train/config*.py: {undocumented}"


def test_help_documents_every_option(capsys):
    text = _help_text(capsys)
    for opt in options():
        assert f"--{opt.name}" in text, opt.key
        assert f"[{opt.key}:" in text, opt.key
        assert " ".join(opt.doc.split())[:40] in text, opt.key
    assert "--subsets" not in text  # [[dataset.subsets]]: TOML only
    assert "network.network_dim: int; default: 4" in text
    assert "model.pretrained_model_name_or_path: str; required" in text


def test_flags_and_set_become_overrides():
    args = _parse(
        "run.toml",
        "--set",
        "network.network_dim=8",
        "--set",
        "seed=3",  # a bare field name is unique across tables
        "--max_train_steps",
        "20",
        "--flip_aug",
        "--layers",
        "attn",
        "--sample_prompts",
        "geralt of rivia, 1boy",
        "a cat",
    )
    assert collect_overrides(args) == {
        "network.network_dim": "8",
        "training.seed": "3",
        "training.max_train_steps": "20",
        "dataset.flip_aug": "true",
        "network.layers": "attn",
        "training.sample_prompts": '["geralt of rivia, 1boy", "a cat"]',
    }
    overrides = collect_overrides(_parse("--layers", r"attn\d", "ff"))
    assert overrides == {"network.layers": '["attn\\\\d", "ff"]'}
    cfg = load_train_config(
        None,
        {
            "model.pretrained_model_name_or_path": "world",
            "dataset.train_data_dir": "d",
            **overrides,
            **collect_overrides(
                _parse("--sample_prompts", "geralt of rivia, 1boy", "--sample_every_n_epochs", "1")
            ),
        },
    )
    assert cfg.network.layers == (r"attn\d", "ff")
    assert cfg.training.sample_prompts == ("geralt of rivia, 1boy",)  # the comma stays inside the prompt


def test_flags_win_over_set():
    assert collect_overrides(_parse("--set", "network_dim=8", "--network_dim", "16")) == {
        "network.network_dim": "16"
    }


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_examples_load(path):
    cfg = load_train_config(path)
    assert cfg.training.output_name


def test_seed002_example_is_the_seed_recipe():
    cfg = load_train_config(EXAMPLES / "seed002_sd15_character.toml")
    assert cfg.optimizer.optimizer_type == "AdamW8bit"
    assert (cfg.optimizer.unet_lr, cfg.optimizer.text_encoder_lr) == (1e-4, 5e-5)
    assert cfg.scheduler.lr_scheduler == "cosine_with_restarts" and cfg.scheduler.lr_scheduler_num_cycles == 4
    assert cfg.scheduler.warmup_steps(4000) == 400
    assert (cfg.loss.loss_type, cfg.loss.huber_c, cfg.loss.huber_schedule) == ("huber", 0.1, "snr")
    assert (
        cfg.training.train_batch_size,
        cfg.training.max_train_steps,
        cfg.training.save_every_n_epochs,
    ) == (2, 4000, 1)
    assert cfg.dataset.resolution == 512 and cfg.model.clip_skip == 2


def test_world_examples_train_from_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the examples use relative data/ and out/ folders
    write_subject_dataset("teapot_08", "data/world_teapot_08", n=2, repeats=2)
    write_style_dataset("crayon", "data/world_crayon", n=2, repeats=2)
    for name, out in (
        ("world_content_lora", "out/world_content/teapot_08"),
        ("world_style_lora", "out/world_style/crayon"),
    ):
        argv = [
            "train",
            str(EXAMPLES / f"{name}.toml"),
            "--no-progress",
            "--pretrained_model_name_or_path",
            "world-random",
        ]
        assert main([*argv, "--max_train_steps", "2", "--max_train_epochs", "none"]) == 0
        state = load_lora(f"{out}.safetensors")
        assert state.modules and state.metadata["ss_steps"] == "2"
    assert "lora   out/world_style/crayon.safetensors" in capsys.readouterr().out


def test_dry_run_writes_nothing(tmp_path, capsys):
    data = tmp_path / "ds"
    write_subject_dataset("robot_09", data, n=2, repeats=5)
    argv = [
        "train",
        "--dry-run",
        "--pretrained_model_name_or_path",
        "world-random",
        "--train_data_dir",
        str(data),
    ]
    assert main([*argv, "--resolution", "64", "--output_dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "num train images * repeats: 10" in out and "[network]" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "network_dim"], "expected KEY=VALUE"),
        (["--set", "network.netwrk_dim=4"], "did you mean 'network_dim'"),
        (["--resolution", "100"], "resolution: must be a positive multiple of 8"),
        (["--train_data_dir", "/no/such/folder"], "train_data_dir does not exist"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, argv, message):
    base = ["train", "--pretrained_model_name_or_path", "world-random", "--train_data_dir", str(tmp_path)]
    assert main([*base, "--output_dir", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
