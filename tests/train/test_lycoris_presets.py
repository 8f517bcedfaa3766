"""LyCORIS presets (kohya's network_args "preset=..."): lorafuse hands them to lycoris's own preset machinery, so
the modules it trains are the ones lycoris selects, and the files load in our reader and in lycoris's loader."""

from __future__ import annotations

import re

import pytest
import torch
from tests.lora.comfy_reference import delta_output

from lorafuse.errors import UserInputError
from lorafuse.lora.io import load_lora
from lorafuse.lora.validate import validate_lora
from lorafuse.models.tiny import tiny_pipeline
from lorafuse.train.config import NetworkConfig
from lorafuse.train.kohya_import import convert_flat
from lorafuse.train.network import create_network
from lorafuse.train.network_lycoris import lycoris_preset

lycoris_kohya = pytest.importorskip(
    "lycoris.kohya", reason="lycoris-lora is not installed (pip install 'lorafuse[lycoris]')"
)


def _ours(preset: str, arch: str = "sd15") -> set[str]:
    """LyCORIS module names lorafuse trains with `preset` (as LyCORIS names them before our kohya renaming)."""
    pipe = tiny_pipeline(arch, seed=0)
    cfg = NetworkConfig(network_module="lycoris.kohya", lycoris_preset=preset, network_dim=4, conv_dim=2)
    return {m.lora_name for _, m in create_network(pipe, cfg, arch)._modules()}


def _lycoris(preset: str, arch: str = "sd15") -> set[str]:
    """What lycoris itself selects: its kohya entry point, as sd-scripts calls it, on the same tiny model."""
    pipe = tiny_pipeline(arch, seed=0)
    tes = [t for t in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if t is not None]
    net = lycoris_kohya.create_network(
        1.0, 4, 1.0, None, tes if len(tes) > 1 else tes[0], pipe.unet, preset=preset, conv_dim=2
    )
    return {m.lora_name for m in [*net.unet_loras, *net.text_encoder_loras]}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("preset", ["attn-mlp", "unet-convblock-only", "unet-transformer-only"])
def test_preset_trains_what_lycoris_selects(preset, arch):
    ours = _ours(preset, arch)
    assert ours and ours == _lycoris(preset, arch)


@pytest.mark.parametrize("preset", ["full", "full-lin", "unet-only"])
def test_full_presets_train_what_lycoris_selects_without_the_double_listing(preset, tmp_path):
    # lycoris-lora 4.1.3 stops on these with a diffusers UNet ("duplicated lora name": the time embedding is listed
    # by its class TimestepEmbedding and by its names); the same preset without the class selects those modules by
    # name, once, and is what lycoris means
    import toml
    from lycoris.config import PRESET

    single = dict(PRESET[preset])
    single["unet_target_module"] = [c for c in single["unet_target_module"] if c != "TimestepEmbedding"]
    path = tmp_path / "single.toml"
    path.write_text(toml.dumps(single))
    full = _ours(preset)
    assert full == _lycoris(str(path))
    assert {"lora_unet_time_embedding_linear_1", "lora_unet_time_embedding_linear_2"} <= full
    assert ("lora_unet_conv_in" in full) == (preset != "full-lin")


def test_attn_only_trains_the_unet_attention():
    # kohya's UNets call their attention class CrossAttention, diffusers' is Attention
    unet = {n for n in _ours("attn-only") if n.startswith("lora_unet")}
    assert unet and all(re.search(r"_attn[12]_(to_q|to_k|to_v|to_out_0)$", n) for n in unet), unet
    assert {n for n in _ours("attn-only") if n.startswith("lora_te")} == _lycoris("attn-only")


def test_preset_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        'enable_conv = true\nunet_target_module = ["ResnetBlock2D"]\nunet_target_name = ["conv_out"]\n'
        'text_encoder_target_module = []\n[module_algo_map.ResnetBlock2D]\nalgo = "lokr"\nfactor = 2\n'
    )
    ours = _ours(str(path))
    assert ours == _lycoris(str(path)) and "lora_unet_conv_out" in ours
    assert not any(n.startswith("lora_te") for n in ours)


@pytest.mark.parametrize(
    ("preset", "says"),
    [
        ("attn_mlp", "neither one of LyCORIS's presets (full, full-lin, attn-mlp"),
        ("ia3", "IA3 algorithm, which is not supported"),
    ],
)
def test_unknown_preset_is_refused(preset, says):
    with pytest.raises(UserInputError, match=re.escape(f"network.lycoris_preset = '{preset}'")) as e:
        lycoris_preset(preset)
    assert says in str(e.value)


def test_bad_preset_files_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('unet_target_modules = ["Transformer2DModel"]\n')  # a typo for unet_target_module
    with pytest.raises(UserInputError, match=r"bad\.toml: not a LyCORIS preset file: Unknown preset keys"):
        lycoris_preset(str(bad))
    other = tmp_path / "preset.txt"  # a preset file is TOML: other files are never read (the web UI passes names)
    other.write_text('unet_target_module = ["Transformer2DModel"]\n')
    with pytest.raises(UserInputError, match="nor a preset TOML file"):
        lycoris_preset(str(other))
    oft = tmp_path / "oft.toml"
    oft.write_text('[module_algo_map.Transformer2DModel]\nalgo = "diag-oft"\n')
    with pytest.raises(
        UserInputError, match=r"oft\.toml: module_algo_map\.Transformer2DModel trains .*'diag-oft'"
    ):
        lycoris_preset(str(oft))


def test_kohya_network_args_preset_maps():
    flat = {
        "pretrained_model_name_or_path": "sd15-tiny", "train_data_dir": "d", "network_module": "lycoris.kohya",
        "network_args": ["preset=attn-mlp", "algo=loha"],
    }  # fmt: skip
    imp = convert_flat(flat)
    assert not imp.refused and imp.data["network"]["lycoris_preset"] == "attn-mlp"
    with pytest.raises(Exception, match="lycoris_preset: is a LyCORIS setting"):
        NetworkConfig(lycoris_preset="attn-mlp")


@pytest.mark.parametrize(("preset", "algo"), [("attn-mlp", "loha"), ("unet-convblock-only", "locon")])
def test_preset_files_load_in_our_reader_and_in_lycoris(preset, algo, tmp_path, monkeypatch):
    from lycoris import wrapper

    pipe = tiny_pipeline("sd15", seed=0)
    torch.manual_seed(0)
    cfg = NetworkConfig(
        network_module="lycoris.kohya", lycoris_preset=preset, algo=algo, network_dim=4, conv_dim=2
    )
    network = create_network(pipe, cfg, "sd15")
    with torch.no_grad():  # LyCORIS zero-initialises one factor; make every update non-zero
        for p in network.named_parameters().values():
            p.add_(torch.randn_like(p) * 0.05)
    path = network.save(tmp_path / "ly.safetensors", arch="sd15", base=pipe, training={}, metadata={},
                        dtype=torch.float32)  # fmt: skip
    state = load_lora(path, base=pipe)
    report = validate_lora(state, pipe, arch="sd15")
    assert not report.warnings and len(state.modules) == sum(len(v) for v in network.plan.values())

    # lycoris's own loader on a fresh UNet (SD1.5's kohya names are its diffusers paths after "lora_unet_"); what
    # each loaded module adds in its forward must be x through our reader's ΔW (its get_diff_weight scales LoHa
    # twice in lycoris-lora 4.1.3, the forward once)
    monkeypatch.setattr(wrapper.LycorisNetwork, "LORA_PREFIX", "lora_unet")
    unet = tiny_pipeline("sd15", seed=0).unet
    loaded, _ = wrapper.create_lycoris_from_weights(1.0, str(path), unet)
    loaded.apply_to()
    unet_keys = {t.path.replace(".", "_"): k for k, t in report.targets.items() if t.component == "unet"}
    assert len(loaded.loras) == len(unet_keys) > 0
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in loaded.loras:
            key = unet_keys[module.lora_name.removeprefix("lora_unet_")]
            org = module.org_module[0]
            x, expected = delta_output(org, state.modules[key].delta_weight(tuple(org.weight.shape)), g)
            torch.testing.assert_close(
                org(x) - module.org_forward(x), expected, rtol=1e-4, atol=1e-5, msg=key
            )
