"""Bad values from a second corpus: TOML numbers beyond 64 bits, marker look-alikes in other scripts, seeds and
step counts out of range, settings a dry run used to pass, grids that failed after making their folder, and
dataset files that hung or crashed a run. Each is one clear error (or a named warning) before any work."""

from __future__ import annotations

import logging
import os

import pytest
from PIL import Image

from lorafuse.errors import UserInputError
from lorafuse.train.config import DatasetConfig
from lorafuse.train.scan import scan_dataset

TRAIN = ["train", "--dry-run", "--resolution", "32"]


# --- configs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value"), [("training.seed", "99999999999999999999"),
                                            ("training.max_train_steps", "-9223372036854775809")])  # fmt: skip
def test_toml_integers_beyond_64_bits(cli, tmp_path, data, key, value):
    """TOML 1.0 forbids them; tomllib returns them, and a seed of that size overflowed far from the config."""
    table, name = key.split(".")
    path = tmp_path / "run.toml"
    path.write_text(f'[model]\npretrained_model_name_or_path = "world-random"\n[dataset]\ntrain_data_dir = "{data}"\n'
                    f'[{table}]\noutput_dir = "{tmp_path / "out"}"\n{name} = {value}\n')  # fmt: skip
    cli.refused(["train", path, "--dry-run"], str(path), key, "64-bit integer", watch=tmp_path)


def test_integer_too_large_for_a_float_field(tmp_path):
    from lorafuse.config.toml_io import config_from_dict
    from lorafuse.errors import ConfigError
    from lorafuse.train.config import TrainConfig

    data = {"model": {"pretrained_model_name_or_path": "w"}, "dataset": {"train_data_dir": "d"},
            "optimizer": {"learning_rate": 10**400}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"optimizer\.learning_rate: must be a finite number"):
        config_from_dict(TrainConfig, data, "x.toml")


def test_grid_seed_beyond_64_bits(cli, tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text('prompt = "a"\n[axes]\nbase = ["world-random"]\nseed = [99999999999999999999]\n')
    cli.refused(["grid", path, "--out", tmp_path / "out"], str(path), "axes.seed", "64-bit integer", watch=tmp_path)


@pytest.mark.parametrize("axis", ["steps = [-1]", "guidance = [inf]", "steps = []"])
def test_grid_plan_errors_name_the_config_file(cli, tmp_path, axis):
    path = tmp_path / "grid.toml"
    path.write_text(f'prompt = "a"\n[axes]\nbase = ["world-random"]\n{axis}\n')
    cli.refused(["grid", path, "--out", tmp_path / "out"], str(path), f"axes.{axis.split()[0]}", watch=tmp_path)


def test_utf16_config_says_so(cli, tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes('[model]\npretrained_model_name_or_path = "world"\n'.encode("utf-16"))
    cli.refused(["train", path, "--dry-run"], str(path), "UTF-16 text; save it as UTF-8", watch=tmp_path)


# --- markers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fake", ["<с>", "<ｃ>", "❮c❯", "˂c˃", "≤c>", "<ć>", "%3Cc%3E", "«c»", "⟨c⟩"]  # с: Cyrillic es
)
def test_marker_lookalikes_from_other_scripts(cli, tmp_path, lora_files, fake):
    prompt = f"a sks teapot {fake} in sks style <s>"
    argv = ["fuse", "--content", lora_files["sd15"], "--style", lora_files["sd15b"], "--prompt", prompt,
            "--method", "craft", "--out", tmp_path / "out"]  # fmt: skip
    cli.refused(argv, repr(prompt), f"{fake!r} looks like a marker", watch=tmp_path)


@pytest.mark.parametrize("prompt", ["café <c> naïve style <s>", "3 ≤ 5 « quoted » <c> b <s>", "x <sks> y <c> z <s>"])
def test_other_scripts_and_brackets_stay_text(prompt):
    from lorafuse.fusion.markers import parse_prompt

    parsed = parse_prompt(prompt)
    assert parsed.order == ("c", "s") and "<c>" not in parsed.clean


# --- command-line numbers ------------------------------------------------------------------------------------


def test_fuse_steps_above_the_schedulers_timesteps(cli, tmp_path, lora_files):
    argv = ["fuse", "--content", lora_files["sd15"], "--style", lora_files["sd15b"], "--prompt", "a dog",
            "--method", "direct", "--base", "world-random", "--out", tmp_path / "out", "--steps", "2000"]  # fmt: skip
    cli.refused(argv, "steps must be at most 1000", watch=tmp_path)


@pytest.mark.parametrize("command", [["fuse", "--content", "a", "--style", "b", "--prompt", "p", "--out", "o"],
                                     ["world", "render", "teapot_08"], ["craft", "pairs", "--out", "o"]])  # fmt: skip
@pytest.mark.parametrize("value", ["99999999999999999999999", "-5"])
def test_seeds_out_of_range_are_usage_errors(capsys, command, value):
    """numpy's generators refuse negative seeds and torch's overflow past 64 bits: both were tracebacks."""
    from lorafuse.cli.main import main

    with pytest.raises(SystemExit) as e:
        main([*command, "--seed", value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"seed {value} is out of range" in err and "Traceback" not in err


def test_api_seed_out_of_range(lora_files):
    from lorafuse.fusion.api import fuse

    with pytest.raises(UserInputError, match="seeds .* must lie in"):
        fuse(lora_files["sd15"], lora_files["sd15b"], prompt="a", method="direct", base="world-random", seed=2**70)


def test_negative_conv_rank_is_refused_without_conv_modules(cli, tmp_path, lora_files):
    argv = ["merge", lora_files["sd15"], lora_files["sd15b"], "--mode", "svd", "--rank", "2", "--conv-rank", "-1",
            "--out", tmp_path / "m.safetensors"]  # fmt: skip
    cli.refused(argv, "conv rank must be an int, at least 1", watch=tmp_path)


# --- what a dry run used to pass -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--pretrained_model_name_or_path", "sd16-tiny"], "sd16-tiny: no such file or folder"),
        (["--pretrained_model_name_or_path", "/nonexistent/base"], "/nonexistent/base: no such file or folder"),
        (["--pretrained_model_name_or_path", "world-random", "--network_weights", "/nonexistent/w.safetensors"],
         "network.network_weights: /nonexistent/w.safetensors: LoRA file not found"),  # fmt: skip
        (["--pretrained_model_name_or_path", "world-random", "--num-processes", "0"], "--num-processes 0"),
    ],
)
def test_dry_run_checks_what_the_run_would_refuse(cli, tmp_path, data, extra, says):
    argv = [*TRAIN, "--train_data_dir", data, "--output_dir", tmp_path / "out", *extra]
    cli.refused(argv, says, watch=tmp_path)


# --- grids ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["unknown base", "lora for another base"])
def test_grid_error_leaves_no_folder_and_no_bar(cli, tmp_path, lora_files, case):
    base, ckpt = ("sd99", lora_files["sd15"]) if case == "unknown base" else ("world-random", lora_files["sdxl"])
    path = tmp_path / "grid.toml"
    path.write_text(f'prompt = "a"\n[axes]\nbase = ["{base}"]\ncheckpoint = ["{ckpt}"]\nsteps = [1]\n')
    out = tmp_path / "out"
    msg = cli.refused(["grid", path, "--out", out], base if case == "unknown base" else str(ckpt), watch=tmp_path)
    assert not out.exists() and "grid cells" not in msg


# --- datasets ------------------------------------------------------------------------------------------------


def _warnings(caplog, cfg):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorafuse"):
        index = scan_dataset(cfg)
    return index, [r.getMessage() for r in caplog.records]


def test_huge_repeats_are_refused_not_hung(tmp_path, data):
    big = data.parent / "big"
    (big / "99999999999999999999_sks dog").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(big / "99999999999999999999_sks dog" / "a.png")
    with pytest.raises(UserInputError, match="99999999999999999999 repeats is more than 10000"):
        scan_dataset(DatasetConfig(train_data_dir=big, resolution=32))


def test_corrupt_exif_is_one_named_warning(tmp_path, data, caplog, capfd):
    folder = data / "2_sks dog"
    bad = folder / "exif.jpg"
    Image.new("RGB", (32, 32)).save(bad, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + bytes(range(40)))
    try:
        _, messages = _warnings(caplog, DatasetConfig(train_data_dir=data, resolution=32))
    finally:
        bad.unlink()
    assert any(m.startswith(f"{bad}: Corrupt EXIF data") for m in messages), messages
    assert "TiffImagePlugin" not in capfd.readouterr().err  # PIL's own warning with its source line is gone


def test_macos_metadata_files_are_skipped_with_a_word(tmp_path, data, caplog):
    folder = data / "2_sks dog"
    junk = folder / "._0.png"
    junk.write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # an AppleDouble header, not a PNG
    try:
        index, messages = _warnings(caplog, DatasetConfig(train_data_dir=data, resolution=32))
    finally:
        junk.unlink()
    assert len(index.items) == 2 and any(f"{junk}: ignored, a macOS metadata file" in m for m in messages)


def test_tiny_image_is_named_as_upscaled(tmp_path, data, caplog):
    folder = data / "2_sks dog"
    tiny = folder / "tiny.png"
    Image.new("RGB", (1, 1), "red").save(tiny)
    try:
        _, messages = _warnings(caplog, DatasetConfig(train_data_dir=data, resolution=32))
    finally:
        tiny.unlink()
    assert any("1 of 3 images are upscaled more than 4x" in m and "tiny.png: 1x1 to 32x32" in m for m in messages)


def test_utf16_caption_says_so(cli, tmp_path, data):
    cap = data / "2_sks dog" / "0.txt"
    before = cap.read_bytes()
    cap.write_bytes("a sks dog".encode("utf-16"))
    try:
        argv = [*TRAIN, "--pretrained_model_name_or_path", "world-random", "--train_data_dir", data, "--output_dir",
                tmp_path / "out"]  # fmt: skip
        cli.refused(argv, str(cap), "UTF-16 text; save it as UTF-8", watch=tmp_path)
    finally:
        cap.write_bytes(before)


def test_non_utf8_file_name_is_used(tmp_path, data, caplog):
    folder = os.fsencode(data / "2_sks dog")
    odd = os.path.join(folder, b"caf\xe9.png")
    Image.new("RGB", (32, 32)).save(odd, format="PNG")
    try:
        index, _ = _warnings(caplog, DatasetConfig(train_data_dir=data, resolution=32))
    finally:
        os.unlink(odd)
    assert len(index.items) == 3


def test_dataset_add_names_a_cut_image_and_a_bad_size_limit(cli, tmp_path, data):
    cut = tmp_path / "cut.png"
    cut.write_bytes((data / "2_sks dog" / "0.png").read_bytes()[:-200])
    cli.refused(["dataset", "add", tmp_path / "ds", cut, "--class", "dog"], "cut.png", "damaged or cut short",
                watch=tmp_path)  # fmt: skip
    for value in ("-1", "nan"):
        cli.refused(["dataset", "add", tmp_path / "ds", data / "2_sks dog" / "0.png", "--class", "dog", "--max-mb",
                     value], f"--max-mb {float(value)}", watch=tmp_path)  # fmt: skip


def test_craft_pairs_generate_checks_steps_before_the_base_loads(cli, tmp_path):
    """--steps 0 was a ZeroDivisionError inside diffusers' scheduler, after the base had loaded."""
    argv = ["craft", "pairs", "--out", tmp_path / "p", "--mode", "generate", "--base", "/nonexistent/base",
            "--content", "a dog", "--style", "ink", "--steps", "0"]  # fmt: skip
    cli.refused(argv, "steps must be an int >= 1, got 0", watch=tmp_path)


def test_stray_top_level_key_does_not_switch_a_config_to_kohya(cli, tmp_path, data):
    """One top-level key made a lorafuse config read as kohya's: its .caption extension (the .txt captions were
    ignored) and its epoch count, with no error."""
    path = tmp_path / "run.toml"
    path.write_text(f'network_dim = 4\n[model]\npretrained_model_name_or_path = "world-random"\n[dataset]\n'
                    f'train_data_dir = "{data}"\n[training]\noutput_dir = "{tmp_path / "out"}"\n')  # fmt: skip
    cli.refused(["train", path, "--dry-run"], str(path), "top-level key 'network_dim'", "it belongs in [network]",
                watch=tmp_path)  # fmt: skip
