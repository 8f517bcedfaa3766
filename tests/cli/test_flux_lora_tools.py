"""`lorafuse inspect | merge | resize | convert | bake` on FLUX.1 LoRA files (kohya BFL names, fused qkv)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafuse.cli.main import main
from lorafuse.lora.io import load_lora, save_lora
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import base_modules
from lorafuse.models.tiny import tiny_pipeline

# attention and MLP of the blocks: what kohya's FLUX.1 LoRA trains
IN_BLOCKS = ("transformer.transformer_blocks.", "transformer.single_transformer_blocks.")


def _flux_lora(pipe, seed: int, rank: int = 3, alpha: float = 1.5) -> LoraState:
    g = torch.Generator().manual_seed(seed)
    modules = {
        key: LoraModule(
            down=torch.randn(rank, ref.shape[1], generator=g),
            up=torch.randn(ref.shape[0], rank, generator=g),
            alpha=alpha,
        )  # fmt: skip
        for key, ref in sorted(base_modules(pipe).modules.items())
        if key.startswith(IN_BLOCKS)
    }
    return LoraState(modules=modules)


def _deltas(state: LoraState) -> dict[str, torch.Tensor]:
    return {k: m.delta_weight() for k, m in state.modules.items()}


def test_inspect_names_the_flux_layout_and_real_size_fit(tmp_path, capsys):
    """A real-width kohya FLUX.1 file (rank 1 keeps it small): it fits FLUX.1 by names and shapes, not SD."""
    g = torch.Generator().manual_seed(0)
    d = 3072
    shapes = {"double_blocks_0_img_attn_qkv": (3 * d, d), "single_blocks_5_linear1": (7 * d, d),
              "single_blocks_5_linear2": (d, 5 * d)}  # fmt: skip
    tensors = {}
    for name, (rows, cols) in shapes.items():
        tensors[f"lora_unet_{name}.lora_down.weight"] = torch.randn(1, cols, generator=g)
        tensors[f"lora_unet_{name}.lora_up.weight"] = torch.randn(rows, 1, generator=g)
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(1.0)
    save_file(tensors, tmp_path / "real.safetensors")
    assert main(["inspect", str(tmp_path / "real.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "format: kohya (9 tensors)" in out
    assert "modules: 8 (transformer 8)" in out  # qkv -> 3, linear1 -> 4, linear2 -> 1
    assert "FLUX.1 8/8 names, 8/8 shapes" in out and "SDXL 0/8 names" in out


def test_convert_kohya_to_diffusers_and_back_keeps_every_delta(tiny_flux, tmp_path, capsys):
    state = _flux_lora(tiny_flux(), seed=1)
    kohya = save_lora(state, tmp_path / "a.safetensors", arch="flux")
    assert (
        main(
            [
                "convert",
                str(kohya),
                "--to",
                "diffusers",
                "--arch",
                "flux",
                "--out",
                str(tmp_path / "d.safetensors"),
            ]
        )
        == 0
    )
    raw = load_file(tmp_path / "d.safetensors")
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in raw
    assert main(["convert", str(tmp_path / "d.safetensors"), "--to", "kohya", "--arch", "flux",
                 "--out", str(tmp_path / "k.safetensors")]) == 0  # fmt: skip
    assert load_file(tmp_path / "k.safetensors").keys() == load_file(kohya).keys()
    back = load_lora(tmp_path / "k.safetensors")
    for key, delta in _deltas(state).items():
        assert torch.equal(back.modules[key].delta_weight(), delta), key
    assert "FLUX.1" in capsys.readouterr().out


def test_convert_refuses_flux_keys_for_an_sd_arch(tiny_flux, tmp_path, capsys):
    kohya = save_lora(_flux_lora(tiny_flux(), seed=2), tmp_path / "a.safetensors", arch="flux")
    assert (
        main(
            [
                "convert",
                str(kohya),
                "--to",
                "kohya",
                "--arch",
                "sdxl",
                "--out",
                str(tmp_path / "x.safetensors"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "a.safetensors" in err and "FLUX.1 LoRA" in err and "SDXL" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_merge_and_resize_flux_files(tiny_flux, tmp_path, capsys):
    pipe = tiny_flux()
    a, b = _flux_lora(pipe, seed=3), _flux_lora(pipe, seed=4, rank=2, alpha=2.0)
    fa = save_lora(a, tmp_path / "a.safetensors", arch="flux")
    fb = save_lora(b, tmp_path / "b.safetensors", arch="flux")
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(fa), str(fb), "--weights", "1", "0.5", "--out", str(out)]) == 0
    assert "FLUX.1 kohya" in capsys.readouterr().out
    merged = load_lora(out)
    da, db = _deltas(a), _deltas(b)
    for key, delta in _deltas(merged).items():
        torch.testing.assert_close(delta, da[key] + 0.5 * db[key], rtol=1e-5, atol=1e-6, msg=key)

    small = tmp_path / "r.safetensors"
    assert main(["resize", str(out), "--rank", "2", "--out", str(small)]) == 0
    resized = load_lora(small)
    assert set(resized.modules) == set(merged.modules)
    assert (
        max(m.rank for m in resized.modules.values()) <= 2 * 3
    )  # a fused qkv stays per-piece rank 2 (x3 in file)
    assert load_file(small)["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] <= 6


def test_merge_refuses_a_flux_and_an_sdxl_file(tiny_flux, tmp_path, capsys):
    flux = save_lora(_flux_lora(tiny_flux(), seed=5), tmp_path / "flux.safetensors", arch="flux")
    sdxl_pipe = tiny_pipeline("sdxl")
    g = torch.Generator().manual_seed(0)
    key = next(k for k in base_modules(sdxl_pipe).modules if k.endswith("attn1.to_q"))
    shape = base_modules(sdxl_pipe).modules[key].shape
    sdxl_state = LoraState(
        {key: LoraModule(torch.randn(2, shape[1], generator=g), torch.randn(shape[0], 2, generator=g))}
    )
    sdxl = save_lora(sdxl_state, tmp_path / "sdxl.safetensors", arch="sdxl")
    assert main(["merge", str(flux), str(sdxl), "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "different base models" in err and "FLUX.1" in err and "SDXL" in err


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_inspect_against_a_flux_folder_and_bake_into_flux_tiny(fmt, tiny_flux, tmp_path, capsys):
    pipe = tiny_flux()
    folder = tmp_path / "flux_base"
    pipe.save_pretrained(folder)
    state = _flux_lora(pipe, seed=6)
    lora = save_lora(state, tmp_path / "a.safetensors", format=fmt, arch="flux")
    assert main(["inspect", str(lora), "--base", str(folder)]) == 0
    n = len(state.modules)
    assert f"coverage against {folder}: {n} of {n} modules (100.0%)" in capsys.readouterr().out

    out = tmp_path / "baked"
    assert main(["bake", "--base", "flux-tiny", "--lora", str(lora), "0.5", "--out", str(out)]) == 0
    from diffusers import FluxTransformer2DModel

    baked = FluxTransformer2DModel.from_pretrained(out / "transformer")
    for key, module in state.modules.items():
        path = key.removeprefix("transformer.")
        expected = pipe.transformer.get_submodule(path).weight + 0.5 * module.delta_weight()
        torch.testing.assert_close(baked.get_submodule(path).weight, expected, rtol=0, atol=1e-6, msg=key)
