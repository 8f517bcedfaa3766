"""Write -> read round trips (kohya and diffusers, SD1.5 and SDXL), cross-format ΔW preservation, metadata."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorafuse.errors import LoraFormatError, OutputError, UserInputError
from lorafuse.lora.io import load_lora, save_lora
from lorafuse.lora.state import LoraModule, LoraState

TRAINING = {"learning_rate": 1e-4, "max_train_steps": 500, "resolution": 512, "seed": 7, "optimizer": "AdamW"}


def _file(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("with_base", [True, False])
def test_round_trip_identical(fmt, arch, with_base, tiny, tmp_path, random_lora, assert_same_lora):
    pipe = tiny(arch)
    state = random_lora(pipe, seed=1)
    # per-module alphas kept as they are (uniform_alpha=False) so that factors must come back bit-identical
    options = {"uniform_alpha": False} if fmt == "kohya" else {}
    path = save_lora(state, tmp_path / "a.safetensors", format=fmt, arch=arch, training=TRAINING, **options)
    loaded = load_lora(path, base=pipe if with_base else None)

    assert_same_lora(state, loaded)
    tensors, metadata = _file(path)
    assert loaded.metadata == metadata
    assert (
        metadata["modelspec.architecture"]
        == {"sd15": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}[arch] + "/lora"
    )
    assert metadata["modelspec.title"] == "a"
    if fmt == "kohya":
        assert loaded.source_format == "kohya"
        assert metadata["ss_network_module"] == "networks.lora"
        assert metadata["ss_network_dim"] == "Dynamic"  # ranks 2 and 4 are mixed
        assert metadata["ss_learning_rate"] == "0.0001" and metadata["ss_max_train_steps"] == "500"
        assert metadata["ss_base_model_version"] == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[arch]
        assert json.loads(metadata["ss_network_args"]).keys() == {"conv_dim", "conv_alpha"}
        prefixes = {k.split("_")[1] for k in tensors}
        assert prefixes == ({"unet", "te"} if arch == "sd15" else {"unet", "te1", "te2"})
        if arch == "sdxl":
            assert any(
                k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in tensors
            )
            assert not any(k.startswith("lora_unet_down_blocks") for k in tensors)
        te = "lora_te_" if arch == "sd15" else "lora_te1_"
        assert any(k.startswith(te + "text_model_encoder_layers_0_self_attn_q_proj.") for k in tensors)
    else:
        assert loaded.source_format == "diffusers_peft"
        assert "ss_network_module" not in metadata
        assert any(k.endswith(".lora_A.weight") and k.startswith("text_encoder.text_model.") for k in tensors)

    # a loaded file saved again is the same file: same tensors, same metadata (date and title are carried)
    again = save_lora(loaded, tmp_path / "b.safetensors", format=fmt, arch=arch, **options)
    tensors2, metadata2 = _file(again)
    assert tensors.keys() == tensors2.keys()
    assert all(torch.equal(tensors[k], tensors2[k]) for k in tensors)
    assert metadata2 == metadata


def test_kohya_default_stores_one_alpha_and_keeps_every_delta(tiny, tmp_path, random_lora, assert_same_lora):
    state = random_lora(tiny("sdxl"), alphas=(1.0, 2.0, 1.0, None))
    path = save_lora(state, tmp_path / "u.safetensors", arch="sdxl")
    tensors, metadata = _file(path)
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {1.0}
    assert metadata["ss_network_alpha"] == "1"
    loaded = load_lora(path)
    for key, module in state.modules.items():
        assert torch.equal(loaded.modules[key].down, module.down)
        torch.testing.assert_close(
            loaded.modules[key].delta_weight(), module.delta_weight(), rtol=1e-6, atol=0
        )
    # a LoRA whose alphas already agree is written bit for bit
    same = random_lora(tiny("sd15"), alphas=(3.0,))
    assert_same_lora(same, load_lora(save_lora(same, tmp_path / "s.safetensors")))


def test_half_precision_round_trips(tiny, tmp_path, random_lora, assert_same_lora):
    state = random_lora(tiny("sd15"), alphas=(2.0,), keep=lambda k: "attn2" in k)
    for module in state.modules.values():
        module.down, module.up = module.down.half(), module.up.half()
    loaded = load_lora(save_lora(state, tmp_path / "h.safetensors"))
    assert_same_lora(state, loaded)


def test_sdxl_kohya_both_unet_namings_read_the_same(tiny, tmp_path, random_lora, assert_same_lora):
    """kohya SDXL files name UNet blocks SGM-style; some tools write diffusers-style names. Same modules."""
    pipe = tiny("sdxl")
    state = random_lora(pipe, keep=lambda k: k.startswith("unet."))
    sgm_path = save_lora(state, tmp_path / "sgm.safetensors", arch="sdxl")
    sd15_style = save_lora(state, tmp_path / "flat.safetensors", arch="sd15")  # diffusers names, lora_unet_
    tensors, _ = _file(sd15_style)
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in tensors)
    a, b = load_lora(sgm_path, base=pipe), load_lora(sd15_style, base=pipe)
    assert_same_lora(a, b)


def test_text_encoder_names_without_text_model_level(tiny, tmp_path, random_lora, assert_same_lora):
    """Files written from transformers-5 module names (no `text_model.`) are read to the same modules."""
    pipe = tiny("sd15")
    state = random_lora(pipe, keep=lambda k: k.startswith("text_encoder."))
    tensors, _ = _file(save_lora(state, tmp_path / "te.safetensors", uniform_alpha=False))
    stripped = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in tensors.items()}
    save_file(stripped, str(tmp_path / "stripped.safetensors"))
    assert_same_lora(state, load_lora(tmp_path / "stripped.safetensors", base=pipe))
    assert_same_lora(state, load_lora(tmp_path / "stripped.safetensors"))  # reference index, no model


def _delta_map(state: LoraState) -> dict[str, torch.Tensor]:
    return {k: m.delta_weight() for k, m in state.modules.items()}


def _assert_same_deltas(a: LoraState, b: LoraState) -> None:
    da, db = _delta_map(a), _delta_map(b)
    assert da.keys() == db.keys()
    for key in da:
        assert torch.equal(da[key], db[key]), key


def test_real_diffusers_file_through_kohya_and_back(tmp_path, lora_assets):
    original = load_lora(lora_assets / "sdlora_diffusers_r4.safetensors")
    kohya = load_lora(save_lora(original, tmp_path / "k.safetensors", arch="sd15"))
    back = load_lora(save_lora(kohya, tmp_path / "d.safetensors", format="diffusers", arch="sd15"))
    assert kohya.source_format == "kohya" and back.source_format == "diffusers_peft"
    assert len(original.modules) == 128
    _assert_same_deltas(original, kohya)
    _assert_same_deltas(original, back)


def test_diffusers_written_sdxl_file_through_kohya_and_back(tiny, tmp_path, random_lora):
    """A file written by diffusers' own `save_lora_weights` (UNet and both text encoders) keeps every ΔW
    through lorafuse -> kohya (SGM names) -> lorafuse -> diffusers format."""
    from diffusers import StableDiffusionXLPipeline

    pipe = tiny("sdxl")
    state = random_lora(
        pipe, alphas=(None,), keep=lambda k: ".attentions." in k or "self_attn" in k or "mlp" in k
    )
    layers: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}, "text_encoder_2": {}}
    for key, m in state.modules.items():
        component, path = key.split(".", 1)
        layers[component][f"{path}.lora_A.weight"] = m.down
        layers[component][f"{path}.lora_B.weight"] = m.up
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"],
    )
    original = load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert original.source_format.startswith("diffusers")
    _assert_same_deltas(state, original)
    kohya = load_lora(save_lora(original, tmp_path / "k.safetensors", arch="sdxl"), base=pipe)
    back = load_lora(save_lora(kohya, tmp_path / "d.safetensors", format="diffusers", arch="sdxl"))
    _assert_same_deltas(original, kohya)
    _assert_same_deltas(original, back)


def test_attention_processor_file_reads_like_its_diffusers_twin(lora_assets):
    state = load_lora(lora_assets / "pokemon_diffusers_attnproc_r4.safetensors")
    assert state.source_format == "diffusers_attnproc"
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in state.modules
    assert all(m.alpha is None and m.rank == 4 for m in state.modules.values())


def test_metadata_precedence_and_training_keys(tiny, tmp_path, random_lora):
    state = random_lora(tiny("sd15"), ranks=(4,), alphas=(2.0,), keep=lambda k: "attn1" in k)
    state.metadata = {"ss_network_dim": "999", "ss_seed": "1", "sshs_model_hash": "stale", "foo": "bar"}
    path = save_lora(
        state,
        tmp_path / "m.safetensors",
        training={"seed": 3, "clip_skip": 2, "tag_frequency": {"dog": 3}},
        metadata={"modelspec.author": "me", "custom": 5},
    )
    _, meta = _file(path)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"  # derived beats carried
    assert meta["ss_seed"] == "3"  # training beats carried
    assert meta["ss_clip_skip"] == "2" and meta["modelspec.encoder_layer"] == "2"
    assert json.loads(meta["ss_tag_frequency"]) == {"dog": 3}
    assert meta["modelspec.author"] == "me" and meta["custom"] == "5"
    assert "sshs_model_hash" not in meta and "foo" not in meta  # hashes of old tensors are not carried
    assert "ss_network_args" not in meta  # no 3x3 conv modules
    with pytest.raises(UserInputError, match="unknown training metadata lr"):
        save_lora(state, tmp_path / "x.safetensors", training={"lr": 1})


def test_dense_modules_cannot_be_written_as_low_rank(tmp_path):
    state = LoraState({"unet.conv_in": LoraModule(delta=torch.ones(4, 4, 3, 3))})
    with pytest.raises(LoraFormatError, match="dense ΔW"):
        save_lora(state, tmp_path / "d.safetensors")


def test_save_checks_inputs_and_is_atomic(tiny, tmp_path, monkeypatch, random_lora):
    state = random_lora(tiny("sd15"), keep=lambda k: "attn2.to_k" in k)
    with pytest.raises(UserInputError, match="safetensors"):
        save_lora(state, tmp_path / "a.pt")
    with pytest.raises(UserInputError, match="unknown LoRA format"):
        save_lora(state, tmp_path / "a.safetensors", format="a1111")
    bad = LoraState({k: LoraModule(down=m.down, up=m.up * float("nan")) for k, m in state.modules.items()})
    with pytest.raises(LoraFormatError, match="non-finite"):
        save_lora(bad, tmp_path / "a.safetensors")

    target = save_lora(state, tmp_path / "keep.safetensors")
    before = target.read_bytes()

    def crash(filename, tensors, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lorafuse.utils.atomic.safetensors_bytes_to", crash)
    with pytest.raises(OutputError, match="keep.safetensors: the disk is full"):
        save_lora(random_lora(tiny("sd15"), seed=5, keep=lambda k: "attn2.to_k" in k), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]


def test_world_base_round_trip(tmp_path, random_lora, assert_same_lora):
    """The built-in world model (layers_per_block=1, SDXL-like blocks): kohya names with diffusers paths,
    read back without the model, then resolved exactly against it by validation."""
    from lorafuse.lora.validate import validate_lora
    from lorafuse.models.world import fresh_components, world_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        parts = fresh_components(world_tokenizer(tmp_path / "tok"))
    base = {"unet": parts["unet"], "text_encoder": parts["text_encoder"]}
    state = random_lora(base, alphas=(4.0,))
    path = save_lora(state, tmp_path / "w.safetensors", arch="world")
    tensors, metadata = _file(path)
    assert metadata["modelspec.architecture"] == "lorafuse-world-v1/lora"
    assert any(k.startswith("lora_unet_up_blocks_0_attentions_1_") for k in tensors)
    loaded = load_lora(path)
    assert_same_lora(state, loaded)
    report = validate_lora(loaded, base, arch="world")
    assert report.matched == len(state.modules)
    assert all(
        target.shape == tuple(state.modules[k].delta_weight().shape) for k, target in report.targets.items()
    )


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
         ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", "up", "diffusers_attnproc")),
        ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k_lora.down.weight",
         ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "down", "diffusers_attnproc")),
        ("text_encoder.text_model.encoder.layers.3.self_attn.to_v_lora.down.weight",
         ("text_encoder.text_model.encoder.layers.3.self_attn.v_proj", "down", "diffusers_attnproc")),
        ("unet.up_blocks.1.resnets.0.conv1.lora.down.weight",
         ("unet.up_blocks.1.resnets.0.conv1", "down", "diffusers")),
        ("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight",
         ("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", "up", "diffusers")),
        ("text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight",
         ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "down", "diffusers_peft")),
        ("base_model.model.down_blocks.1.attentions.0.proj_in.lora_B.default.weight",
         ("unet.down_blocks.1.attentions.0.proj_in", "up", "diffusers_peft")),
        ("unet.conv_in.alpha", ("unet.conv_in", "alpha", "")),
    ],
)  # fmt: skip
def test_diffusers_key_layouts(key, expected):
    from lorafuse.lora.formats.diffusers import parse_key

    assert parse_key(key)[:3] == expected


def test_diffusers_alpha_sources(tmp_path):
    """`<module>.alpha` tensors and diffusers' lora_adapter_metadata both give the scale; PEFT patterns match
    the module as a suffix, so a pattern without `text_model.` covers both text-encoder spellings."""
    down, up = torch.randn(2, 8), torch.randn(8, 2)
    save_file(
        {
            "unet.conv_in.lora_A.weight": down.clone(),
            "unet.conv_in.lora_B.weight": up.clone(),
            "unet.conv_in.alpha": torch.tensor(1.0),
            "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": down.clone(),
            "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": up.clone(),
            "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_A.weight": down.clone(),
            "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_B.weight": up.clone(),
        },
        str(tmp_path / "a.safetensors"),
        metadata={
            "lora_adapter_metadata": json.dumps(
                {
                    "text_encoder.lora_alpha": 4,
                    "text_encoder.alpha_pattern": {r"encoder\.layers\.1\.mlp\.fc1": 8},
                }
            )
        },
    )
    state = load_lora(tmp_path / "a.safetensors")
    assert state.modules["unet.conv_in"].scale == 0.5
    assert state.modules["text_encoder.text_model.encoder.layers.0.mlp.fc1"].scale == 2.0
    assert state.modules["text_encoder.text_model.encoder.layers.1.mlp.fc1"].scale == 4.0
    save_file(
        {"unet.conv_in.lora_A.a.weight": down, "unet.conv_in.lora_B.a.weight": up,
         "unet.conv_out.lora_A.b.weight": down.clone(), "unet.conv_out.lora_B.b.weight": up.clone()},
        str(tmp_path / "two.safetensors"),
    )  # fmt: skip
    with pytest.raises(LoraFormatError, match="several PEFT adapters"):
        load_lora(tmp_path / "two.safetensors")
