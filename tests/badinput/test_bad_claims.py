"""Tensors over claims: convert, resize and merge check the shapes against the architecture they write for, and
a contradiction with the metadata or --arch is an error naming both (it used to write a file that loads nowhere)."""

from __future__ import annotations

import pytest


@pytest.fixture
def lying(tmp_path, lora_files, h):
    """The SD1.5 file with metadata that claims SDXL."""
    tensors = h.kohya_tensors(lora_files["sd15"])
    meta = {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "ss_base_model_version": "sdxl_base_v1-0"}
    return h.write_tensors(tmp_path / "lying.safetensors", tensors, meta)


@pytest.mark.parametrize(
    ("tool", "extra"),
    [("convert", ["--to", "kohya", "--arch", "sdxl"]), ("resize", ["--rank", "1", "--arch", "sdxl"]),
     ("convert", ["--to", "diffusers", "--arch", "world"]), ("resize", ["--rank", "1", "--arch", "world"])],  # fmt: skip
)
def test_arch_flag_contradicted_by_shapes(cli, tmp_path, lora_files, tool, extra):
    arch = extra[-1]
    label = {"sdxl": "SDXL", "world": "built-in world"}[arch]
    cli.refused([tool, lora_files["sd15"], *extra, "--out", tmp_path / "o.safetensors"], "sd15.safetensors",
                f"--arch {arch} says {label}, but the tensors say SD1.5", "4 of 4 modules", watch=tmp_path)  # fmt: skip


def test_merge_arch_flag_contradicted(cli, tmp_path, lora_files):
    argv = ["merge", lora_files["sd15"], lora_files["sd15b"], "--arch", "sdxl", "--out", tmp_path / "m.safetensors"]
    cli.refused(argv, "--arch sdxl says SDXL, but the tensors say SD1.5", watch=tmp_path)


@pytest.mark.parametrize("tool", ["convert", "resize", "merge"])
def test_metadata_contradicted_by_shapes(cli, tmp_path, lying, lora_files, tool):
    out = tmp_path / "o.safetensors"
    argv = {
        "convert": ["convert", lying, "--to", "kohya", "--arch", "sd15", "--out", out],
        "resize": ["resize", lying, "--rank", "1", "--out", out],
        "merge": ["merge", lying, lora_files["sd15b"], "--out", out],
    }[tool]
    cli.refused(argv, "lying.safetensors: metadata modelspec.architecture", "says SDXL, but the tensors say SD1.5",
                watch=tmp_path)  # fmt: skip


def test_sdxl_tensors_converted_as_sd15(cli, tmp_path, lora_files):
    argv = ["convert", lora_files["sdxl"], "--to", "kohya", "--arch", "sd15", "--out", tmp_path / "o.safetensors"]
    cli.refused(argv, "sdxl.safetensors", "--arch sd15 says SD1.5, but the tensors say SDXL", watch=tmp_path)


def test_merge_of_two_architectures(cli, tmp_path, lora_files):
    argv = ["merge", lora_files["sd15"], lora_files["sdxl"], "--out", tmp_path / "m.safetensors"]
    cli.refused(argv, "different base models", "SD1.5", "SDXL", watch=tmp_path)


def test_honest_files_still_convert_and_round_trip(cli, tmp_path, lora_files):
    from lorafuse.lora.io import load_lora

    for arch in ("sd15", "sdxl"):
        out = tmp_path / f"{arch}.safetensors"
        code, _, err = cli("convert", lora_files[arch], "--to", "diffusers", "--arch", arch, "--out", out)
        assert code == 0, err
        a, b = load_lora(lora_files[arch]), load_lora(out)
        assert set(a.modules) == set(b.modules)
