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


def test_folder_with_only_model_index_gets_one_clear_error(saved_sd15, tmp_path):
    """Only model_index.json (or component folders deleted): every model component is named, none of the
    weightless ones (tokenizer, scheduler, feature extractor), before diffusers' raw OSError."""
    import shutil

    only_index = tmp_path / "index_only"
    only_index.mkdir()
    shutil.copy(saved_sd15 / "model_index.json", only_index)
    with pytest.raises(UserInputError) as info:
        load_base_pipeline(str(only_index))
    message = str(info.value)
    for name in ("text_encoder", "unet", "vae"):
        assert f"{name} (no {name}/ folder)" in message
    for name in ("tokenizer", "scheduler", "feature_extractor", "safety_checker"):
        assert f"{name} (" not in message


def test_weights_as_pickle_bin_files_load_with_torch_weights_only(saved_sd15, tmp_path, monkeypatch):
    """A diffusers folder saved with .bin weights loads: diffusers reads them with torch.load(weights_only=True),
    which unpickles tensors only (no code runs)."""
    import torch

    pipe = load_base_pipeline(str(saved_sd15))
    as_bin = tmp_path / "bin"
    pipe.save_pretrained(as_bin, safe_serialization=False)
    assert any(p.suffix == ".bin" for p in as_bin.rglob("*"))
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    again = load_base_pipeline(str(as_bin))
    assert seen and all(w is True for w in seen)
    ref, got = pipe.unet.state_dict(), again.unet.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
