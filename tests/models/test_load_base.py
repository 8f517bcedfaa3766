"""`load_base_pipeline` on folders that are not usable bases: one clear error, before diffusers' tracebacks."""

from __future__ import annotations

import pytest

from lorafuse.errors import UserInputError
from lorafuse.models.load import load_base_pipeline
from lorafuse.models.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def saved_sd15(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15")
    tiny_pipeline("sd15").save_pretrained(folder)
    return folder


def _weights(folder):
    return [p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin")]


def test_complete_folder_loads(saved_sd15):
    assert type(load_base_pipeline(str(saved_sd15))).__name__ == "StableDiffusionPipeline"


def test_folder_without_weights_gets_one_clear_error(saved_sd15, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(saved_sd15, bare)
    for p in _weights(bare):
        p.unlink()
    with pytest.raises(UserInputError) as info:
        load_base_pipeline(str(bare))
    message = str(info.value)
    assert str(bare) in message and "no weights for" in message
    for name in ("text_encoder", "unet", "vae"):
        assert name in message
    assert "tokenizer" not in message.split("no weights for")[1].split("(")[0]  # tokenizers have no weights


def test_git_lfs_pointers_are_not_weights(saved_sd15, tmp_path):
    import shutil

    bare = tmp_path / "lfs"
    shutil.copytree(saved_sd15, bare)
    unet_files = [p for p in _weights(bare) if p.parent.name == "unet"]
    assert unet_files
    for p in unet_files:
        p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 3438167534\n")
    with pytest.raises(UserInputError, match=r"no weights for unet \(only git-lfs pointer files\)"):
        load_base_pipeline(str(bare))
