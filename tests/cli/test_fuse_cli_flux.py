"""`lorafuse fuse --base flux-tiny --method all`: every method that can run on FLUX.1 fuses two diffusers-format
LoRAs on the transformer; B-LoRA is refused by name with the reason, and ZipLoRA without references is skipped."""

from __future__ import annotations

import json

import pytest

from lorafuse.cli.main import main
from lorafuse.fusion.registry import method_names
from lorafuse.fusion.synthetic import random_lora
from lorafuse.lora.io import save_lora
from lorafuse.models.load import load_base_pipeline


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux-loras")
    pipe = load_base_pipeline("flux-tiny")
    content = save_lora(random_lora(pipe, seed=1, rank=(2, 4), scale=0.3), tmp / "dog.safetensors",
                        format="diffusers", arch="flux")  # fmt: skip
    style = save_lora(random_lora(pipe, seed=2, rank=4, scale=0.25), tmp / "ink.safetensors",
                      format="diffusers", arch="flux")  # fmt: skip
    return content, style


def test_method_all_on_flux_tiny(flux_files, tmp_path, capsys) -> None:
    content, style = flux_files
    argv = ["fuse", "--content", str(content), "--style", str(style), "--prompt", "a red car", "--out",
            str(tmp_path), "--base", "flux-tiny", "--steps", "2", "--no-progress", "--method", "all"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((tmp_path / "record.json").read_text())
    ran, skipped = set(record["methods"]), set(record["skipped"])
    assert ran | skipped == set(method_names())
    assert {"direct", "klora", "switch", "composite", "nplora", "craft"} <= ran
    assert all(r["sampling"]["arch"] == "flux" for r in record["methods"].values())
    err = capsys.readouterr().err
    assert "blora" in err and "no FLUX blocks have been published" in err


def test_blora_alone_is_refused_with_the_reason(flux_files, tmp_path, capsys) -> None:
    content, style = flux_files
    argv = ["fuse", "--content", str(content), "--style", str(style), "--prompt", "a red car", "--out",
            str(tmp_path), "--base", "flux-tiny", "--steps", "2", "--no-progress", "--method", "blora"]  # fmt: skip
    assert main(argv) == 2
    assert "blora is not available on FLUX.1" in capsys.readouterr().err


def test_lorafuse_train_then_fuse_on_flux_tiny(tmp_path, monkeypatch, capsys) -> None:
    """The FLUX example config trains on flux-tiny from the command line (kohya-format files, a sample grid during
    training), and `lorafuse fuse --base flux-tiny` fuses two such LoRAs."""
    from pathlib import Path

    from lorafuse.lora.io import load_lora
    from lorafuse.world.dataset import write_style_dataset, write_subject_dataset

    example = Path(__file__).resolve().parents[2] / "examples" / "flux_subject_lora.toml"
    monkeypatch.chdir(tmp_path)
    write_subject_dataset("teapot_08", "data/teapot", n=2, repeats=1)
    write_style_dataset("crayon", "data/crayon", n=2, repeats=1)
    small = ["--pretrained_model_name_or_path", "flux-tiny", "--resolution", "64", "--enable_bucket", "false",
             "--mixed_precision", "no", "--optimizer_type", "AdamW", "--max_train_epochs", "1",
             "--sample_steps", "2", "--sample_every_n_epochs", "1", "--no-progress"]  # fmt: skip
    files = {}
    for role, data in (("content", "data/teapot"), ("style", "data/crayon")):
        argv = ["train", str(example), *small, "--train_data_dir", data, "--output_name", role]
        assert main(argv) == 0
        files[role] = Path("out/flux_subject") / f"{role}.safetensors"
        state = load_lora(files[role])
        assert state.metadata["ss_network_module"] == "networks.lora_flux"
        assert {k.split(".")[0] for k in state.modules} == {"transformer"}
    assert len(list(Path("out/flux_subject/samples").glob("*.png"))) == 2
    argv = ["fuse", "--content", str(files["content"]), "--style", str(files["style"]), "--prompt",
            "a sks teapot", "--out", "fused", "--base", "flux-tiny", "--steps", "2", "--no-progress",
            "--method", "klora"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads(Path("fused/record.json").read_text())
    assert record["method"] == "klora" and record["sampling"]["arch"] == "flux"
    assert [Path(lora["source"]).name for lora in record["loras"]] == ["content.safetensors", "style.safetensors"]
