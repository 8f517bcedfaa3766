"""`lorafuse inspect | merge | resize | convert` on small LoRA files for the tiny SD1.5 / SDXL pipelines."""

from __future__ import annotations

import functools

import pytest
import torch

from lorafuse.cli.main import main
from lorafuse.lora.io import load_lora, save_lora
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import base_modules
from lorafuse.models.tiny import tiny_pipeline

SUFFIXES = ("to_q", "to_v", "conv1", "q_proj")


@functools.lru_cache(maxsize=2)
def _modules(arch: str):
    return base_modules(tiny_pipeline(arch, seed=0)).modules


def write_lora(
    path,
    arch: str = "sd15",
    *,
    rank: int = 4,
    alpha: float = 2.0,
    seed: int = 0,
    only=SUFFIXES,
    within: str = "",
) -> LoraState:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for key, ref in sorted(_modules(arch).items()):
        if key.endswith(only) and within in key:
            out_f, in_f, *kernel = ref.shape
            modules[key] = LoraModule(
                down=torch.randn((rank, in_f, *kernel), generator=g),
                up=torch.randn((out_f, rank, *([1, 1] if kernel else [])), generator=g),
                alpha=alpha,
            )
    state = LoraState(modules=modules)
    save_lora(state, path, arch=arch)
    return state


def deltas(state: LoraState) -> dict[str, torch.Tensor]:
    return {k: m.delta_weight() for k, m in state.modules.items()}


def test_inspect_shows_format_ranks_metadata_and_coverage(tmp_path, capsys):
    f = tmp_path / "a.safetensors"
    state = write_lora(f)
    assert main(["inspect", str(f), "--base", "sd15-tiny"]) == 0
    out = capsys.readouterr().out
    assert "format: kohya" in out
    assert f"({3 * len(state.modules)} tensors)" in out  # down, up, alpha per module
    assert f"modules: {len(state.modules)}" in out and "conv " in out
    assert "ranks: 4 x" in out and "alphas: 2 x" in out
    assert "ss_network_dim = 4" in out and "ss_base_model_version = sd_v1" in out
    n = len(state.modules)
    assert (
        f"coverage against sd15-tiny (names only: the tiny base has smaller widths): {n} of {n} modules"
        in out
    )


def test_inspect_without_base_reports_fit_to_real_architectures(tmp_path, capsys):
    f = tmp_path / "a.safetensors"
    state = write_lora(f)
    assert main(["inspect", str(f)]) == 0
    n = len(state.modules)
    assert f"SD1.5 {n}/{n} names" in capsys.readouterr().out


def test_inspect_against_the_wrong_base(tmp_path, capsys):
    partial, none = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_lora(partial, only=("conv1",))  # SDXL has down_blocks.0-2 resnets too, but no down_blocks.3
    write_lora(none, only=("conv1",), within="down_blocks.3")
    assert main(["inspect", str(partial), "--base", "sdxl-tiny"]) == 0
    assert "warning: " in capsys.readouterr().out
    assert main(["inspect", str(none), "--base", "sdxl-tiny"]) == 2
    err = capsys.readouterr().err
    assert "match no module of this SDXL base (they look like SD1.5 keys)" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert main(["inspect", str(tmp_path / "nope.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_merge_exact_writes_the_weighted_sum(tmp_path, capsys):
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    sa = write_lora(a, rank=4, alpha=2.0, seed=0)
    sb = write_lora(b, rank=8, alpha=8.0, seed=1, only=("to_q", "to_k"))
    assert main(["merge", str(a), str(b), "--weights", "1", "0.5", "--out", str(out)]) == 0
    assert "exact merge" in capsys.readouterr().out
    merged = load_lora(out)
    assert set(merged.modules) == set(sa.modules) | set(sb.modules)
    da, db, dm = deltas(sa), deltas(sb), deltas(merged)
    for key, d in dm.items():
        expected = da.get(key, 0) + 0.5 * db.get(key, 0)
        torch.testing.assert_close(d, expected, atol=1e-4, rtol=1e-5)
    assert '"mode": "exact"' in merged.metadata["lorafuse.merge"]


def test_merge_svd_and_argument_errors(tmp_path, capsys):
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    write_lora(a, seed=0)
    write_lora(b, seed=1)
    assert main(["merge", str(a), str(b), "--mode", "svd", "--rank", "2", "--out", str(out)]) == 0
    assert "svd relative Frobenius error" in capsys.readouterr().out
    assert max(load_lora(out).ranks().values()) == 2
    assert main(["merge", str(a), str(b), "--weights", "1", "--out", str(out)]) == 2
    assert "one weight per file" in capsys.readouterr().err
    assert main(["merge", str(a), str(b), "--rank", "2", "--out", str(out)]) == 2
    assert "--rank only applies to --mode svd" in capsys.readouterr().err


def test_merge_refuses_loras_for_different_bases(tmp_path, capsys):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_lora(a, "sd15")
    write_lora(b, "sdxl")
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "different base models" in capsys.readouterr().err


def test_resize_reports_error_and_lowers_rank(tmp_path, capsys):
    f, out = tmp_path / "a.safetensors", tmp_path / "r.safetensors"
    write_lora(f, rank=4)
    assert main(["resize", str(f), "--rank", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "relative Frobenius error total" in text
    assert set(load_lora(out).ranks().values()) == {2}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_convert_round_trips_delta(tmp_path, capsys, arch):
    f, out, back = tmp_path / "a.safetensors", tmp_path / "d.safetensors", tmp_path / "k.safetensors"
    state = write_lora(f, arch)
    assert main(["convert", str(f), "--to", "diffusers", "--arch", arch, "--out", str(out)]) == 0
    converted = load_lora(out)
    assert converted.source_format.startswith("diffusers")
    assert main(["convert", str(out), "--to", "kohya", "--arch", arch, "--out", str(back)]) == 0
    for loaded in (converted, load_lora(back)):
        for key, d in deltas(loaded).items():
            torch.testing.assert_close(d, state.modules[key].delta_weight(), atol=1e-5, rtol=1e-5)


def test_convert_to_the_wrong_arch_is_an_error(tmp_path, capsys):
    f = tmp_path / "a.safetensors"
    write_lora(f, "sd15", only=("conv1",))
    assert (
        main(["convert", str(f), "--to", "kohya", "--arch", "sdxl", "--out", str(tmp_path / "x.safetensors")])
        == 2
    )
    assert "match no module of this SDXL base (they look like SD1.5 keys)" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_inspect_against_a_pipeline_folder_checks_names_and_shapes(tmp_path, capsys, arch):
    """--base PATH builds the UNet and text encoders from their configs on the meta device (no weights read)."""
    folder = tmp_path / "base"
    tiny_pipeline(arch, seed=0).save_pretrained(folder)
    f = tmp_path / "a.safetensors"
    state = write_lora(f, arch)
    assert main(["inspect", str(f), "--base", str(folder)]) == 0
    n = len(state.modules)
    assert f"coverage against {folder}: {n} of {n} modules (100.0%)" in capsys.readouterr().out
    assert main(["inspect", str(f), "--base", str(tmp_path)]) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err
