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
