"""save_precision: fp16 / bf16 LoRA files load everywhere the float32 file loads, at half the size.

Checked per architecture: the same keys as the float32 file, ComfyUI's loader logic (tests/lora/comfy_reference.py:
every key consumed, each ΔW reshaping to its base weight), our reader and
validate_lora, and diffusers' load_lora_weights giving the same ΔW as the float32 file up to the dtype's rounding.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from lorafuse.lora.io import load_lora, save_lora
from lorafuse.lora.validate import validate_lora
from lorafuse.models.tiny import tiny_pipeline

from .comfy_reference import delta as comfy_delta
from .comfy_reference import load as comfy_load

EPS = {torch.float16: 1e-3, torch.bfloat16: 8e-3}  # relative rounding of one factor, with margin


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _comfy_check(tensors, pipe):
    """ComfyUI's loader (tests/lora/comfy_reference.py, from its source): every key consumed, each module a
    plain LoRA whose ΔW reshapes to its base weight."""
    patches, not_loaded = comfy_load(tensors, pipe)
    assert not not_loaded, sorted(not_loaded)[:5]
    for (comp, path), (kind, parts, alpha) in patches.items():
        assert kind == "lora" and alpha is not None
        comfy_delta(kind, parts, alpha, getattr(pipe, comp).get_submodule(path).weight.shape)


def _delta(layer):
    return layer.get_delta_weight(layer.active_adapters[0]).detach().float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_half_precision_file_loads_like_the_float32_one(arch, dtype, tmp_path, random_lora):
    pipe = tiny_pipeline(arch, seed=0)
    state = random_lora(pipe, seed=1, keep=lambda k: not k.endswith("text_projection"))
    full = save_lora(state, tmp_path / "full.safetensors", arch=arch)
    half = save_lora(state, tmp_path / "half.safetensors", arch=arch, dtype=dtype)

    t_full, t_half = _tensors(full), _tensors(half)
    assert set(t_full) == set(t_half)
    assert all(t.dtype == dtype for t in t_half.values())
    assert half.stat().st_size < 0.6 * full.stat().st_size
    _comfy_check(t_half, pipe)
    for key, value in t_full.items():  # each tensor is the float32 one rounded once
        err = (t_half[key].float() - value).abs().max() / value.abs().max().clamp_min(1e-12)
        assert err <= EPS[dtype], key

    ours_full, ours_half = load_lora(full, base=pipe), load_lora(half, base=pipe)
    assert set(ours_full.modules) == set(ours_half.modules)
    assert not validate_lora(ours_half, pipe, arch=arch).warnings

    deltas = {}
    for name, path in (("full", full), ("half", half)):
        client = tiny_pipeline(arch, seed=0)
        client.load_lora_weights(str(path))
        from peft.tuners.lora import LoraLayer

        deltas[name] = {
            f"{c}.{n}": _delta(m)
            for c in ("unet", "text_encoder", "text_encoder_2")
            if getattr(client, c, None) is not None
            for n, m in getattr(client, c).named_modules()
            if isinstance(m, LoraLayer)
        }
    assert deltas["full"].keys() == deltas["half"].keys() and deltas["full"]
    for key, ref in deltas["full"].items():
        err = (deltas["half"][key] - ref).abs().max() / ref.abs().max()
        assert err < 4 * EPS[dtype], key  # a product of two rounded factors
