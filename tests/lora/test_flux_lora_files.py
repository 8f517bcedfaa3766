"""FLUX.1 LoRA files: the BFL name table, exact fused <-> split conversion, every layout we read, and diffusers'
own converters as the reference for what kohya and XLabs files mean.

Exactness. Fused -> split and split -> fused only slice and concatenate factors, so a round trip whose pieces
share one scale must be bit-identical (factors, dtypes, effective alpha). With unequal scales in one fused
Linear the scales are folded into B (one float32 rounding per factor), so those are compared as ΔW at 1e-6.
diffusers bakes alpha into the factors (a power-of-two split of the scale, `scale_down` / `scale_up`), so
against its converters ΔW agrees to float32 rounding of a rank <= 12 product: rtol 1e-5, atol 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.lora_conversion_utils import (
    _convert_kohya_flux_lora_to_diffusers,
    _convert_xlabs_flux_lora_to_diffusers,
)
from safetensors.torch import load_file, save_file

from lorafuse.errors import LoraFormatError
from lorafuse.families.flux import TRANSFORMER as FLUX_TRANSFORMER
from lorafuse.families.flux import transformer_shapes
from lorafuse.lora.flux_keys import bfl_from_flat, bfl_target, target_of
from lorafuse.lora.io import load_lora, save_lora
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import base_modules, reference_modules
from lorafuse.lora.validate import validate_lora
from lorafuse.models.tiny import tiny_pipeline

FLUX_KEYS = lambda k: k.startswith("transformer.")  # noqa: E731
# what kohya and diffusers FLUX.1 LoRAs hold: the transformer and CLIP-L (flux-tiny also has T5, never trained)
LORA_KEYS = lambda k: k.startswith(("transformer.", "text_encoder."))  # noqa: E731


def _delta(module: LoraModule) -> torch.Tensor:
    return module.delta_weight().double()


def _assert_same_delta(ours: dict[str, LoraModule], theirs: dict[str, torch.Tensor]) -> None:
    """theirs: diffusers' converted PEFT state dict {`<key>.lora_A.weight`: A, `<key>.lora_B.weight`: B}."""
    # diffusers 0.42 leaves the `transformer.` prefix off the modules outside the blocks (and its pipeline
    # loader then skips them): the mapping is still its own, so compare it with the prefix put back
    theirs = {
        k if k.startswith(("transformer.", "text_encoder.")) else f"transformer.{k}": v
        for k, v in theirs.items()
    }
    keys = {k.removesuffix(".lora_A.weight") for k in theirs if k.endswith(".lora_A.weight")}
    assert keys == set(ours)
    for key in keys:
        delta = theirs[f"{key}.lora_B.weight"].double() @ theirs[f"{key}.lora_A.weight"].double()
        torch.testing.assert_close(_delta(ours[key]), delta, rtol=1e-5, atol=1e-6, msg=key)


def test_reference_shapes_are_those_of_the_built_model(tiny_flux):
    """`transformer_shapes` is written out from the architecture; a built model must agree exactly."""
    transformer = tiny_flux().transformer
    built = {k: ref.shape for k, ref in base_modules(transformer).modules.items()}
    assert built == transformer_shapes(dict(transformer.config))
    assert "transformer.time_text_embed.guidance_embedder.linear_1" in built


def test_every_transformer_linear_has_one_bfl_name(tiny_flux):
    pipe = tiny_flux()
    keys = [k for k in base_modules(pipe).modules if FLUX_KEYS(k)]
    owners: dict[str, set[int]] = {}
    for key in keys:
        hit = target_of(key)
        assert hit is not None, key
        target, j = hit
        assert target.pieces[j] == key
        assert bfl_target(target.bfl) == target
        assert bfl_from_flat(target.bfl.replace(".", "_")) == target.bfl
        owners.setdefault(target.bfl, set()).add(j)
    # every fused Linear is covered by all of its pieces, each exactly once
    for bfl, pieces in owners.items():
        assert pieces == set(range(len(bfl_target(bfl).pieces))), bfl
    assert "double_blocks.1.img_attn.qkv" in owners and "single_blocks.1.linear1" in owners


def _flux_lora(pipe, random_lora, **kw) -> LoraState:
    return random_lora(pipe, keep=FLUX_KEYS, **kw)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_round_trip_is_bit_identical_when_pieces_share_a_scale(fmt, tiny_flux, random_lora, assert_same_lora,
                                                               tmp_path):  # fmt: skip
    pipe = tiny_flux()
    state = random_lora(pipe, seed=1, ranks=(3,), alphas=(1.5,), keep=LORA_KEYS)
    if fmt == "kohya":  # modules outside the blocks (img_in, final_layer, ...) get a warning about diffusers
        with pytest.warns(UserWarning, match="diffusers' loader .* silently skips"):
            path = save_lora(state, tmp_path / "a.safetensors", format=fmt)
    else:
        path = save_lora(state, tmp_path / "a.safetensors", format=fmt)
    back = load_lora(path)
    assert back.source_format == ("kohya" if fmt == "kohya" else "diffusers_peft")
    assert_same_lora(state, back)
    if fmt == "kohya":
        raw = load_file(path)
        # q, k, v of a double block: A stacked (3 pieces x rank 3), B block diagonal, alpha kept at scale 0.5
        assert raw["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (9, 32)
        assert raw["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (32 * 3 + 128, 12)
        assert raw["lora_unet_single_blocks_1_linear1.alpha"].item() == 0.5 * 12
        assert any(k.startswith("lora_te1_") for k in raw)


def test_missing_pieces_are_zero_rows_and_read_back_as_missing(
    tiny_flux, random_lora, assert_same_lora, tmp_path
):
    """Only q and k of a double block, only the MLP of a single block's linear1: zero rows in the fused B."""
    pipe = tiny_flux()
    wanted = {f"transformer.{p}" for p in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                            "single_transformer_blocks.1.proj_mlp")}  # fmt: skip
    state = random_lora(pipe, seed=11, ranks=(2,), alphas=(4.0,), keep=wanted.__contains__)
    assert len(state.modules) == 3
    path = save_lora(state, tmp_path / "a.safetensors")
    raw = load_file(path)
    up = raw["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert up.shape == (96, 4) and not up[64:].any()
    assert raw["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (32 * 3 + 128, 2)
    assert_same_lora(state, load_lora(path))


def test_mixed_ranks_and_alphas_keep_every_delta(tiny_flux, random_lora, tmp_path):
    pipe = tiny_flux()
    state = _flux_lora(pipe, random_lora, seed=2, ranks=(2, 4, 3), alphas=(1.0, 2.0, None, 8.0))
    back = load_lora(save_lora(state, tmp_path / "a.safetensors"))
    assert set(back.modules) == set(state.modules)
    for key, module in state.modules.items():
        torch.testing.assert_close(_delta(back.modules[key]), _delta(module), rtol=1e-6, atol=1e-7, msg=key)


def _kohya_fused_file(
    pipe, seed: int, rank: int = 4, block_diagonal: bool = False
) -> dict[str, torch.Tensor]:
    """A kohya sd-scripts FLUX.1 file as kohya trains it: one (A, B) per fused BFL Linear (`split_qkv`:
    A stacked per piece and B block diagonal), alpha per module."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: r.shape for k, r in base_modules(pipe).modules.items() if FLUX_KEYS(k)}
    out: dict[str, torch.Tensor] = {}
    for bfl in sorted({target_of(k)[0].bfl for k in shapes}):
        target = bfl_target(bfl)
        rows = sum(shapes[k][0] for k in target.pieces)
        cols = shapes[target.pieces[0]][1]
        name = "lora_unet_" + bfl.replace(".", "_")
        if block_diagonal and len(target.pieces) > 1:
            n = len(target.pieces)
            down = torch.randn(n * rank, cols, generator=g)
            up = torch.block_diag(*[torch.randn(shapes[k][0], rank, generator=g) for k in target.pieces])
            alpha = 2.0 * n
        else:
            down, up, alpha = torch.randn(rank, cols, generator=g), torch.randn(rows, rank, generator=g), 2.0
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down * 0.1, up * 0.1
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def test_kohya_file_round_trips_bit_for_bit(tiny_flux, tmp_path):
    """kohya file -> canonical (split, shared A) -> kohya file: the same tensors, bit for bit."""
    tensors = _kohya_fused_file(tiny_flux(), seed=3)
    save_file(tensors, tmp_path / "kohya.safetensors")
    state = load_lora(tmp_path / "kohya.safetensors")
    assert "transformer.single_transformer_blocks.0.proj_mlp" in state.modules
    again = load_file(save_lora(state, tmp_path / "again.safetensors", arch="flux"))
    assert set(again) == set(tensors)
    for key, tensor in tensors.items():
        assert torch.equal(again[key], tensor), key


@pytest.mark.parametrize("block_diagonal", [False, True])
def test_kohya_reading_agrees_with_diffusers_converter(block_diagonal, tiny_flux):
    """Everything but single blocks' linear1, whose row split diffusers hard-codes at FLUX.1's width (3072):
    that one is checked at the real width below."""
    tensors = _kohya_fused_file(tiny_flux(), seed=4, block_diagonal=block_diagonal)
    tensors = {k: v for k, v in tensors.items() if "linear1" not in k}
    for name in ("lora_unet_final_layer_linear", "lora_unet_final_layer_adaLN_modulation_1"):
        # diffusers' converter ignores final_layer alphas (a TODO in it): compare at alpha = rank
        tensors[f"{name}.alpha"] = torch.tensor(float(tensors[f"{name}.lora_down.weight"].shape[0]))
    state = _load_dict(tensors)
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
    _assert_same_delta(state.modules, theirs)
    if block_diagonal:  # split_qkv files come back at the per-piece rank, as kohya trained them
        assert state.modules["transformer.transformer_blocks.0.attn.add_k_proj"].rank == 4


@pytest.mark.parametrize("block_diagonal", [False, True])
def test_linear1_at_real_width_agrees_with_diffusers_converter(block_diagonal):
    """One single block's linear1 at FLUX.1's real size (3072 -> 3·3072 + 12288 rows), rank 2: small factors."""
    g = torch.Generator().manual_seed(5)
    d, mlp, r = 3072, 4 * 3072, 2
    if block_diagonal:
        down = torch.randn(4 * r, d, generator=g)
        up = torch.block_diag(*[torch.randn(n, r, generator=g) for n in (d, d, d, mlp)])
    else:
        down, up = torch.randn(r, d, generator=g), torch.randn(3 * d + mlp, r, generator=g)
    name = "lora_unet_single_blocks_7_linear1"
    tensors = {
        f"{name}.lora_down.weight": down,
        f"{name}.lora_up.weight": up,
        f"{name}.alpha": torch.tensor(4.0),
    }
    state = _load_dict(tensors)
    _assert_same_delta(state.modules, _convert_kohya_flux_lora_to_diffusers(dict(tensors)))
    assert {m.rank for m in state.modules.values()} == {r}
    downs = [m.down for m in state.modules.values()]
    shared = all(x is downs[0] for x in downs)
    assert shared != block_diagonal  # block diagonal: each piece its own rows of A; else one A for all
    report = validate_lora(state, reference_modules("flux"), arch="flux")
    assert report.matched == 4 and not report.unmatched


def _load_dict(tensors: dict[str, torch.Tensor], name: str = "lora.safetensors") -> LoraState:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        return load_lora(path)


def _xlabs_file(pipe, seed: int, rank: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = pipe.transformer.inner_dim
    out: dict[str, torch.Tensor] = {}

    def pair(prefix: str, rows: int, cols: int) -> None:
        out[f"{prefix}.down.weight"] = torch.randn(rank, cols, generator=g) * 0.1
        out[f"{prefix}.up.weight"] = torch.randn(rows, rank, generator=g) * 0.1

    for i in range(pipe.transformer.config.num_layers):
        for stream in ("1", "2"):
            pair(f"double_blocks.{i}.processor.qkv_lora{stream}", 3 * d, d)
            pair(f"double_blocks.{i}.processor.proj_lora{stream}", d, d)
    for i in range(pipe.transformer.config.num_single_layers):
        pair(f"single_blocks.{i}.processor.qkv_lora", 3 * d, d)
        pair(f"single_blocks.{i}.processor.proj_lora", d, 5 * d)
    return out


def test_xlabs_reading_agrees_with_diffusers_converter(tiny_flux):
    pipe = tiny_flux()
    tensors = _xlabs_file(pipe, seed=6)
    state = _load_dict(tensors)
    assert state.source_format == "xlabs"
    _assert_same_delta(state.modules, _convert_xlabs_flux_lora_to_diffusers(dict(tensors)))
    validate_lora(state, pipe, arch="flux")  # every key lands on a module of the right shape


@pytest.mark.parametrize("naming", ["lora_A", "lora_down", "bare", "fal"])
def test_comfyui_names_read_like_kohya(naming, tiny_flux, assert_same_lora):
    """ComfyUI / BFL files hold kohya's tensors under BFL's dotted names: the same canonical LoRA."""
    tensors = _kohya_fused_file(tiny_flux(), seed=7)
    kohya = _load_dict(tensors)
    prefix = {"fal": "base_model.model.", "bare": ""}.get(naming, "diffusion_model.")
    parts = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}
    renamed = {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        bfl = bfl_from_flat(name.removeprefix("lora_unet_"))
        renamed[f"{prefix}{bfl}.{part if naming == 'lora_down' else parts[part]}"] = tensor
    comfy = _load_dict(renamed)
    assert comfy.source_format == "comfyui"
    assert_same_lora(kohya, comfy)


def test_wrong_family_is_one_error_naming_file_and_both_families(tiny_flux, random_lora, tmp_path):
    flux_pipe, sdxl_pipe = tiny_flux(), tiny_pipeline("sdxl")
    flux_file = save_lora(random_lora(flux_pipe, seed=8, keep=LORA_KEYS), tmp_path / "flux_style.safetensors")
    with pytest.raises(LoraFormatError) as err:
        validate_lora(load_lora(flux_file), sdxl_pipe, arch="sdxl")
    message = str(err.value)
    assert "flux_style.safetensors" in message and "FLUX.1 LoRA" in message and "base is SDXL" in message

    sdxl_file = save_lora(random_lora(sdxl_pipe, seed=9), tmp_path / "sdxl_style.safetensors", arch="sdxl")
    with pytest.raises(LoraFormatError) as err:
        validate_lora(load_lora(sdxl_file), flux_pipe, arch="flux")
    message = str(err.value)
    assert "sdxl_style.safetensors" in message and "SDXL LoRA" in message and "base is FLUX.1" in message


def test_unknown_bfl_module_and_wrong_rows_are_clear_errors(tmp_path):
    bad = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 16),
           "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(47, 2)}  # fmt: skip
    with pytest.raises(LoraFormatError, match="47 output rows do not split"):
        _load_dict(bad)
    with pytest.raises(LoraFormatError, match="no LoRA format lorafuse reads"):
        _load_dict({"diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": torch.randn(8)})


def test_reference_flux_covers_a_real_kohya_layout():
    """Every BFL name of the real 19 + 38 block FLUX.1-dev resolves, with the real shapes."""
    shapes = transformer_shapes(FLUX_TRANSFORMER)
    assert len(shapes) == 19 * 14 + 38 * 6 + 10
    assert shapes["transformer.single_transformer_blocks.37.proj_out"] == (3072, 3072 + 12288)


def test_lora_transformer_prefix_reads_like_diffusers_converter(tiny_flux):
    """kohya-style names over diffusers' module paths (`lora_transformer_transformer_blocks_0_attn_to_q`), as
    some trainers write them. diffusers' converter for them handles attention projections only, so that is
    what the file holds."""
    g = torch.Generator().manual_seed(12)
    tensors = {}
    for key, ref in base_modules(tiny_flux()).modules.items():
        if key.startswith("transformer.") and ".attn." in key:
            name = "lora_transformer_" + key.removeprefix("transformer.").replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = torch.randn(2, ref.shape[1], generator=g)
            tensors[f"{name}.lora_up.weight"] = torch.randn(ref.shape[0], 2, generator=g)
            tensors[f"{name}.alpha"] = torch.tensor(1.0)
    state = _load_dict(tensors)  # no base: names resolve against the real FLUX.1 module list
    assert len(state.modules) == 2 * 8 + 4 * 3  # flux-tiny: 2 double, 4 single blocks
    _assert_same_delta(state.modules, _convert_kohya_flux_lora_to_diffusers(dict(tensors)))
