"""Validation before any work: coverage errors and warnings, shape mismatches, the real SD1.5 files."""

from __future__ import annotations

import warnings

import pytest
import torch

from lorafuse.errors import LoraFormatError
from lorafuse.lora.archs import reference_components
from lorafuse.lora.io import load_lora, save_lora
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import reference_modules
from lorafuse.lora.validate import LoraCoverageWarning, validate_lora


def real_size_lora(arch: str, keep) -> LoraState:
    """Rank-1 LoRA with the real architecture's shapes (cheap: only the factors are materialised)."""
    modules = {}
    for key, ref in reference_modules(arch).modules.items():
        if keep(key) and len(ref.shape) == 2:
            modules[key] = LoraModule(
                down=torch.full((1, ref.shape[1]), 0.1), up=torch.full((ref.shape[0], 1), 0.1)
            )
    return LoraState(modules=modules, source_path="style.safetensors")


def test_full_coverage_has_no_warnings(tiny, random_lora):
    pipe = tiny("sdxl")
    state = random_lora(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = validate_lora(state, pipe, arch="sdxl")
    assert report.matched == report.total == len(state.modules) and report.coverage == 1.0
    assert not report.unmatched and not report.warnings
    # text encoder targets carry the module's real path: no `text_model.` in transformers-5 CLIPTextModel
    te1 = report.targets["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    assert te1.path == "encoder.layers.0.self_attn.q_proj"
    assert pipe.text_encoder.get_submodule(te1.path).weight.shape == te1.shape
    te2 = report.targets["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"]
    assert te2.path == "text_model.encoder.layers.0.self_attn.q_proj"


def test_zero_match_is_an_error_that_says_what_the_keys_are(tiny):
    # SD1.5-only modules (SDXL's first down block has no attention) with real SD1.5 shapes
    state = real_size_lora("sd15", lambda k: k.startswith("unet.down_blocks.0.attentions."))
    with pytest.raises(LoraFormatError) as err:
        validate_lora(state, tiny("sdxl"), arch="sdxl")
    message = str(err.value)
    n = len(state.modules)
    assert message.startswith(f"style.safetensors: {n} of {n} LoRA keys match no module of this SDXL base")
    assert "(they look like SD1.5 keys)" in message
    assert "'unet.down_blocks.0.attentions.0." in message


def test_zero_match_quotes_the_names_in_the_file(tiny, random_lora, tmp_path):
    """Keys of a scaled-down SD1.5 model on SDXL: guessed by name, and shown as the file spells them."""
    state = random_lora(tiny("sd15"), keep=lambda k: k.startswith("unet.up_blocks.3."))
    path = save_lora(state, tmp_path / "sd15_style.safetensors", arch="sd15")
    with pytest.raises(LoraFormatError) as err:
        validate_lora(load_lora(path), tiny("sdxl"), arch="sdxl")
    message = str(err.value)
    assert "sd15_style.safetensors:" in message and "(they look like SD1.5 keys)" in message
    assert "'lora_unet_up_blocks_3_" in message


def test_partial_coverage_warns_with_counts_and_examples(tiny):
    state = real_size_lora("sd15", lambda k: ".attentions." in k and k.startswith("unet.down_blocks."))
    n_foreign = sum(k.startswith("unet.down_blocks.0.") for k in state.modules)
    with pytest.warns(LoraCoverageWarning) as caught:
        report = validate_lora(state, tiny("sdxl"), arch="sdxl", check_shapes=False)
    message = str(caught[0].message)
    assert f"{n_foreign} of {len(state.modules)} LoRA keys match no module of this SDXL base" in message
    assert "cannot be applied, e.g. 'unet.down_blocks.0." in message
    assert report.warnings == [message]
    assert len(report.unmatched) == n_foreign and report.matched == len(state.modules) - n_foreign


def test_shape_mismatch_names_key_expected_and_found(tiny):
    state = real_size_lora("sd15", lambda k: k.endswith("attn2.to_k") and "down_blocks.1" in k)
    with pytest.raises(LoraFormatError) as err:
        validate_lora(state, reference_components("sdxl"), arch="sdxl")
    message = str(err.value)
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    assert f"{key}: base weight (640, 2048), LoRA ΔW (640, 768)" in message
    assert "(they look like SD1.5 keys)" in message


def test_text_encoder_lora_on_a_unet_only_base(tiny, random_lora):
    state = random_lora(tiny("sd15"), keep=lambda k: k.startswith("text_encoder."))
    with pytest.raises(LoraFormatError, match="the base has no text_encoder"):
        validate_lora(state, tiny("sd15").unet, arch="sd15")


def test_assets_fit_tiny_sd15_by_name_and_real_sd15_by_shape(tiny, lora_assets):
    for name in ("pokemon_diffusers_attnproc_r4.safetensors", "sdlora_diffusers_r4.safetensors"):
        state = load_lora(lora_assets / name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            by_name = validate_lora(state, tiny("sd15"), arch="sd15", check_shapes=False)
            by_shape = validate_lora(state, reference_components("sd15"), arch="sd15")
        assert by_name.matched == by_shape.matched == by_name.total == 128
        with pytest.raises(LoraFormatError, match="do not fit the weight shapes"):
            validate_lora(state, tiny("sd15"), arch="sd15")  # tiny widths are 32, not 320


def test_kohya_names_resolve_against_the_base_itself(tiny, random_lora, tmp_path):
    """A file loaded without a model gets canonical keys from the reference layout; validation re-resolves
    its kohya names against the base's own modules, so targets are exact."""
    pipe = tiny("sdxl")
    state = random_lora(pipe, keep=lambda k: k.startswith("unet.up_blocks.") or "upsamplers" in k)
    loaded = load_lora(save_lora(state, tmp_path / "x.safetensors", arch="sdxl"))
    report = validate_lora(loaded, pipe, arch="sdxl")
    assert report.matched == len(state.modules)
    for key, target in report.targets.items():
        assert f"unet.{target.path}" == key
