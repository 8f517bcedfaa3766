"""Refusing unsafe, damaged and malformed files, with messages that name the file, the key and the way out."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lorafuse.errors import LoraFormatError
from lorafuse.lora.io import load_lora, save_lora


def load_lora_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


class NotATensor:
    """Unpickling this needs arbitrary code execution: weights_only loading must refuse it."""


@pytest.fixture
def small_kohya(tiny, tmp_path, random_lora):
    state = random_lora(tiny("sd15"), keep=lambda k: "attn2" in k)
    return state, save_lora(state, tmp_path / "small.safetensors", uniform_alpha=False)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_refused_without_opt_in(suffix, small_kohya, tmp_path):
    _, path = small_kohya
    tensors = load_lora_tensors(path)
    pickle_path = tmp_path / f"lora{suffix}"
    torch.save(tensors, pickle_path)
    with pytest.raises(LoraFormatError) as err:
        load_lora(pickle_path)
    message = str(err.value)
    assert str(pickle_path) in message and "allow_pickle=True" in message and "weights_only" in message


def test_pickle_with_opt_in_uses_weights_only(small_kohya, tmp_path, assert_same_lora):
    state, path = small_kohya
    pickle_path = tmp_path / "lora.pt"
    torch.save({"state_dict": load_lora_tensors(path)}, pickle_path)
    loaded = load_lora(pickle_path, allow_pickle=True)
    assert_same_lora(state, loaded)

    evil = tmp_path / "evil.pt"
    torch.save({"lora_unet_x.lora_down.weight": NotATensor()}, evil)
    with pytest.raises(LoraFormatError, match="weights_only"):
        load_lora(evil, allow_pickle=True)


@pytest.mark.parametrize("cut", [4, 60, -100, -1])
def test_truncated_file(cut, small_kohya, tmp_path):
    _, path = small_kohya
    data = path.read_bytes()
    broken = tmp_path / "truncated.safetensors"
    broken.write_bytes(data[:cut])
    with pytest.raises(LoraFormatError, match=r"truncated\.safetensors: not a readable safetensors file"):
        load_lora(broken)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(LoraFormatError, match="no such file"):
        load_lora(tmp_path / "nope.safetensors")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(LoraFormatError, match="unknown LoRA file type"):
        load_lora(tmp_path / "x.gguf")


def test_non_finite_tensor_is_named(small_kohya, tmp_path):
    _, path = small_kohya
    tensors = load_lora_tensors(path)
    key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[3]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(tmp_path / "inf.safetensors"))
    with pytest.raises(LoraFormatError, match=rf"inf\.safetensors: tensor '{key}' has 1 non-finite"):
        load_lora(tmp_path / "inf.safetensors")


def test_broken_kohya_like_asset_is_refused_with_an_explanation(lora_assets):
    with pytest.raises(LoraFormatError) as err:
        load_lora(lora_assets / "broken_kohya_like.safetensors")
    message = str(err.value)
    assert "broken_kohya_like.safetensors: not a valid kohya LoRA" in message
    assert "joined with '_' instead of '.'" in message
    assert "doubled" in message and "no `.alpha`" in message
    assert "apply nothing" in message


def test_broken_kohya_like_synthetic(tmp_path):
    """The same defect built here, so the check runs without the assets too."""
    name = "lora_unet_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    save_file(
        {f"{name}_lora_down.weight": torch.ones(4, 32), f"{name}_lora_up.weight": torch.ones(32, 4)},
        str(tmp_path / "bad.safetensors"),
    )
    with pytest.raises(LoraFormatError, match="not a valid kohya LoRA.*joined with '_'"):
        load_lora(tmp_path / "bad.safetensors")


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2)}, "full Stable Diffusion checkpoint"),
        ({"emb_params": torch.ones(2, 4)}, "textual-inversion embedding"),
        ({"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4), "weird": torch.ones(1)}, "1 of 2 keys"),
        (
            {"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
             "lora_unet_conv_in.lora_up.weight": torch.ones(8, 2, 1, 1),
             "lora_unet_conv_in.dora_scale": torch.ones(1, 4, 1, 1)},
            "DoRA",
        ),
        ({"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4)}, "incomplete module"),
        (
            {"unet.conv_in.lora_A.weight": torch.ones(2, 4), "unet.conv_in.lora_B.weight": torch.ones(8, 3)},
            "rank mismatch",
        ),
    ],
)  # fmt: skip
def test_unreadable_contents(tensors, match, tmp_path):
    save_file(tensors, str(tmp_path / "f.safetensors"))
    with pytest.raises(LoraFormatError, match=match):
        load_lora(tmp_path / "f.safetensors")
