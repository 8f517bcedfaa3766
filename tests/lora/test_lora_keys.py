"""Key mapping: canonical <-> kohya names, SGM block names checked against diffusers' own converter."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lorafuse.errors import LoraFormatError
from lorafuse.families.sdxl import UNET as SDXL_UNET
from lorafuse.lora.keys import (
    SDXL_LAYOUT,
    KeyIndex,
    flat,
    kohya_name,
    sgm_to_unet,
    split_key,
    unet_to_sgm,
)
from lorafuse.lora.targets import base_modules, reference_modules


def _diffusers_names_of_sgm_file(names: list[str], unet_config: dict) -> set[str]:
    """What diffusers' own loader makes of kohya SGM names: its converter, then its PEFT renaming."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    sd = {}
    for name in names:
        sd[f"{name}.lora_down.weight"] = torch.zeros(1)
        sd[f"{name}.lora_up.weight"] = torch.zeros(1)
    sd = _maybe_map_sgm_blocks_to_diffusers(sd, SimpleNamespace(**unet_config))
    converted, _ = _convert_non_diffusers_lora_to_diffusers(sd)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    return {k.rsplit(".lora_A", 1)[0] for k in peft if ".lora_A" in k}


@pytest.mark.parametrize("which", ["reference", "tiny"])
def test_sgm_names_agree_with_diffusers_converter(which, tiny):
    """Every Linear/Conv2d of the SDXL UNet (attention, ff, proj, resnet convs, time_emb_proj, samplers,
    conv_in/out, time and add embeddings): our kohya SGM name, converted by diffusers, is the same module."""
    if which == "reference":
        base, config = reference_modules("sdxl"), SDXL_UNET
    else:
        pipe = tiny("sdxl")
        base, config = base_modules(pipe), dict(pipe.unet.config)
    unet_keys = [k for k in base.modules if k.startswith("unet.")]
    names = {kohya_name(k, "sdxl", base.layout): split_key(k)[1] for k in unet_keys}
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_unet_time_embed_", "lora_unet_label_emb_", "lora_unet_out_")) for n in names)  # fmt: skip
    assert _diffusers_names_of_sgm_file(list(names), config) == set(names.values())
    assert len(names) == len(unet_keys)  # injective: no two modules share a name


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_sgm_round_trip_every_unet_module(arch):
    base = reference_modules(arch)
    seen = set()
    for key in base.modules:
        component, path = split_key(key)
        if component != "unet":
            continue
        sgm = unet_to_sgm(path, base.layout)
        assert sgm is not None, path
        assert sgm_to_unet(sgm, base.layout) == path
        seen.add(sgm)
    assert len(seen) == sum(k.startswith("unet.") for k in base.modules)


@pytest.mark.parametrize(
    ("arch", "key", "name"),
    [
        ("sdxl", "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
         "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
        ("sdxl", "unet.down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj",
         "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_0_proj"),
        ("sdxl", "unet.mid_block.attentions.0.proj_in", "lora_unet_middle_block_1_proj_in"),
        ("sdxl", "unet.mid_block.resnets.1.conv2", "lora_unet_middle_block_2_out_layers_3"),
        ("sdxl", "unet.down_blocks.0.downsamplers.0.conv", "lora_unet_input_blocks_3_0_op"),
        ("sdxl", "unet.down_blocks.1.resnets.0.time_emb_proj", "lora_unet_input_blocks_4_0_emb_layers_1"),
        ("sdxl", "unet.down_blocks.1.resnets.0.conv_shortcut", "lora_unet_input_blocks_4_0_skip_connection"),
        ("sdxl", "unet.up_blocks.0.upsamplers.0.conv", "lora_unet_output_blocks_2_2_conv"),
        ("sdxl", "unet.up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_out.0",
         "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_out_0"),
        ("sdxl", "unet.up_blocks.2.resnets.2.conv1", "lora_unet_output_blocks_8_0_in_layers_2"),
        ("sdxl", "unet.add_embedding.linear_1", "lora_unet_label_emb_0_0"),
        ("sdxl", "unet.conv_in", "lora_unet_input_blocks_0_0"),
        ("sdxl", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
         "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
        ("sdxl", "text_encoder_2.text_model.encoder.layers.31.mlp.fc2", "lora_te2_text_model_encoder_layers_31_mlp_fc2"),
        ("sdxl", "text_encoder_2.text_projection", "lora_te2_text_projection"),
        ("sd15", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"),
        ("sd15", "unet.up_blocks.0.upsamplers.0.conv", "lora_unet_up_blocks_0_upsamplers_0_conv"),
        ("sd15", "text_encoder.text_model.encoder.layers.11.self_attn.out_proj",
         "lora_te_text_model_encoder_layers_11_self_attn_out_proj"),
    ],
)  # fmt: skip
def test_known_kohya_names(arch, key, name):
    assert kohya_name(key, arch, SDXL_LAYOUT if arch == "sdxl" else None) == name
    assert reference_modules(arch).index.from_kohya(name) == key


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("which", ["reference", "tiny"])
def test_every_module_maps_back_exactly(arch, which, tiny):
    base = reference_modules(arch) if which == "reference" else base_modules(tiny(arch))
    for key in base.modules:
        assert base.index.from_kohya(kohya_name(key, arch, base.layout)) == key
    if arch == "sdxl":  # kohya SDXL files with diffusers-style UNet names are read too
        for key in base.modules:
            component, path = split_key(key)
            if component == "unet":
                assert base.index.from_kohya("lora_unet_" + flat(path)) == key


def test_text_encoder_spellings(tiny):
    """transformers 5 CLIPTextModel has no `text_model.` level; kohya names always have it. Both resolve."""
    sd15 = base_modules(tiny("sd15"))
    key = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert sd15.index.from_kohya("lora_te_text_model_encoder_layers_0_self_attn_q_proj") == key
    assert sd15.index.from_kohya("lora_te_encoder_layers_0_self_attn_q_proj") == key
    real_path = sd15.modules[key].path
    assert tiny("sd15").text_encoder.get_submodule(real_path) is not None
    sdxl = base_modules(tiny("sdxl"))
    te2 = sdxl.modules["text_encoder_2.text_model.encoder.layers.1.mlp.fc1"]
    assert tiny("sdxl").text_encoder_2.get_submodule(te2.path) is not None
    assert sdxl.index.from_kohya("lora_te2_text_model_encoder_layers_1_mlp_fc1") == "text_encoder_2." + (
        "text_model.encoder.layers.1.mlp.fc1"
    )


def test_ambiguous_flat_name_is_never_resolved_silently():
    index = KeyIndex(["unet.a_b.c", "unet.a.b_c"])
    with pytest.raises(LoraFormatError, match="more than one module"):
        index.from_kohya("lora_unet_a_b_c")


def test_guess_for_names_outside_the_index():
    index = reference_modules("sdxl").index
    guess = index.guess_path("unet", "down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_out_0")
    assert guess == "down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_out.0"
