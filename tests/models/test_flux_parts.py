"""FLUX.1 from separate files (kohya's pretrained_model_name_or_path + ae + clip_l + t5xxl): the assembled
pipeline has exactly the original weights and samples the same latents; bad files fail first, by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tests.flux_disk import transformer_to_bfl, write_parts

from lorafuse.errors import UserInputError
from lorafuse.models import flux_files, flux_parts
from lorafuse.models.load import load_base_pipeline

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def _load(paths: dict[str, Path], **kw):
    parts = {k: str(v) for k, v in paths.items() if k in ("ae", "clip_l", "t5xxl")}
    kw.setdefault("tokenizers", str(paths["tokenizers"]))
    return load_base_pipeline(str(paths["pretrained_model_name_or_path"]), parts=parts, **kw)


@pytest.fixture(scope="module")
def original(tiny_flux):
    return tiny_flux()


@pytest.fixture
def files(original, tmp_path):
    return write_parts(original, tmp_path / "parts")


def _latents(pipe) -> torch.Tensor:
    kw = dict(prompt="a red robot", height=64, width=64, num_inference_steps=2, output_type="latent")
    return pipe(**kw, generator=torch.Generator().manual_seed(0)).images


def test_separate_files_give_the_original_pipeline(original, files):
    pipe = _load(files)
    for name in COMPONENTS:
        want, got = getattr(original, name).state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert pipe.transformer.config.guidance_embeds and pipe.scheduler.config.use_dynamic_shifting
    assert torch.equal(_latents(pipe), _latents(original))


def test_fp8_transformer_is_upcast_and_schnell_is_detected(tiny_flux, tmp_path, monkeypatch):
    schnell = tiny_flux(schnell=True)
    files = write_parts(schnell, tmp_path / "parts", fp8=True)
    for option in ("pretrained_model_name_or_path", "ae"):  # BFL's first release: flux1-schnell.sft, ae.sft
        files[option] = files[option].rename(files[option].with_suffix(".sft"))
    from lorafuse.models import meta

    monkeypatch.setattr(meta, "reference_components", lambda name: name)  # what `train --estimate` sizes
    assert meta.meta_components(str(files["pretrained_model_name_or_path"])) == "flux"
    pipe = _load(files, dtype="bf16")
    assert not pipe.transformer.config.guidance_embeds  # no guidance_in weights: schnell
    assert pipe.scheduler.config.shift == 1.0 and not pipe.scheduler.config.use_dynamic_shifting
    for k, v in schnell.transformer.state_dict().items():
        got = pipe.transformer.state_dict()[k]
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, v.to(torch.float8_e4m3fn).to(torch.bfloat16)), k


def test_converter_equals_diffusers_at_flux_width():
    """At FLUX.1's real width (3072, which diffusers' converter fixes) both converters give the same tensors;
    one column per weight keeps the 2-block model small."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from lorafuse.families.flux import transformer_shapes
    from lorafuse.models.tiny_flux import transformer_config

    config = {**transformer_config(), "num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 2,
              "num_single_layers": 2, "joint_attention_dim": 8, "pooled_projection_dim": 8}  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for key, (rows, _) in transformer_shapes(config).items():
        name = key.removeprefix("transformer.")
        sd[f"{name}.weight"] = torch.randn(rows, 1, generator=gen)
        sd[f"{name}.bias"] = torch.randn(rows, generator=gen)
    for prefix, n in (("transformer_blocks", 2), ("single_transformer_blocks", 2)):
        norms = (
            ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
            if prefix == "transformer_blocks"
            else ("norm_q", "norm_k")
        )
        for i in range(n):
            sd.update({f"{prefix}.{i}.attn.{m}.weight": torch.randn(128, generator=gen) for m in norms})
    bfl = transformer_to_bfl(sd, 2, 2)
    ours = flux_files.transformer_to_diffusers(dict(bfl))
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert ours.keys() == theirs.keys() == sd.keys()
    assert all(torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], sd[k]) for k in sd)


def test_comfyui_prefixes_and_t5_variants():
    w = torch.ones(2)
    t5 = flux_files.t5_to_transformers(
        {"block.0.layer.0.SelfAttention.q.weight": w, "encoder.embed_tokens.weight": w}
    )
    assert set(t5) == {
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        "shared.weight",
        "encoder.embed_tokens.weight",
    }
    clip = flux_files.clip_to_transformers(
        {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": w, "logit_scale": w},
        ["text_model.final_layer_norm.weight"],
    )
    assert list(clip) == ["text_model.final_layer_norm.weight"]
    bfl = {
        "model.diffusion_model.img_in.weight": torch.ones(4, 2),
        "model.diffusion_model.img_in.bias": w,
        "vae.encoder.conv_in.weight": w,
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": w,
    }
    assert set(flux_files.transformer_to_diffusers(bfl)) == {
        "x_embedder.weight",
        "x_embedder.bias",
    }  # ComfyUI's
    diffusers_names = {"x_embedder.weight": w}  # a transformer saved with diffusers' names loads as it is
    assert flux_files.transformer_to_diffusers(diffusers_names) == diffusers_names


def test_tokenizers_option_needs_part_files():
    from lorafuse.errors import ConfigError
    from lorafuse.train.config import ModelConfig

    with pytest.raises(ConfigError, match="tokenizers: completes the separate files"):
        ModelConfig("flux-tiny", tokenizers="/models/FLUX.1-dev")
    model = ModelConfig("flux1-dev.safetensors", ae="ae.safetensors", tokenizers="/models/FLUX.1-dev")
    assert model.part_files == {"ae": "ae.safetensors"}


# --- bad input: one error naming the file and the problem, before any weight is read ---------------------


def test_a_part_that_is_another_component(files):
    with pytest.raises(
        UserInputError, match=r"t5xxl = .*ae\.safetensors: this file holds an autoencoder .*not a T5"
    ):
        _load({**files, "t5xxl": files["ae"]})
    with pytest.raises(
        UserInputError, match=r"clip_l = .*t5xxl_fp16\.safetensors: this file holds a T5 encoder"
    ):
        _load({**files, "clip_l": files["t5xxl"]})


def test_an_sdxl_checkpoint_as_the_transformer(files, tmp_path):
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, sdxl)  # fmt: skip
    with pytest.raises(
        UserInputError, match=r"sdxl\.safetensors: a checkpoint of the SDXL family, but model\.ae.*FLUX\.1"
    ):
        _load({**files, "pretrained_model_name_or_path": sdxl})
    with pytest.raises(
        UserInputError, match=r"ae = .*sdxl\.safetensors: this file holds a whole SDXL checkpoint"
    ):
        _load({**files, "ae": sdxl})


def test_missing_truncated_and_incomplete(files, tmp_path):
    pickle = tmp_path / "ae.ckpt"
    pickle.write_bytes(b"not loaded")
    with pytest.raises(UserInputError, match=r"ae = .*ae\.ckpt: only \.safetensors / \.sft files are loaded"):
        _load({**files, "ae": pickle})
    with pytest.raises(UserInputError, match=r"clip_l = .*nowhere\.safetensors: no such file"):
        _load({**files, "clip_l": tmp_path / "nowhere.safetensors"})
    cut = tmp_path / "ae_cut.safetensors"
    data = files["ae"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        UserInputError, match=r"ae = .*ae_cut\.safetensors: not a readable safetensors file.*truncated"
    ):
        _load({**files, "ae": cut})
    with pytest.raises(
        UserInputError, match=r"needs model\.ae, model\.clip_l and model\.t5xxl.*missing: t5xxl"
    ):
        load_base_pipeline(str(files["pretrained_model_name_or_path"]), parts={"ae": str(files["ae"]),
                           "clip_l": str(files["clip_l"])})  # fmt: skip


def test_sizes_the_configs_do_not_describe(files, tmp_path):
    """Without a folder's configs the released FLUX.1 ones apply, which the tiny files do not fit: named, with
    the fix."""
    import shutil

    folder = tmp_path / "tokenizers-only"
    for sub in ("tokenizer", "tokenizer_2"):
        (folder / sub).mkdir(parents=True)
    with pytest.raises(UserInputError, match=r"flux1-dev\.safetensors: heads of width 16, but the RoPE axes"):
        _load(files, tokenizers=str(folder))
    shutil.copytree(files["tokenizers"] / "transformer", folder / "transformer")
    with pytest.raises(
        UserInputError, match=r"ae = .*ae\.safetensors: does not fit the vae model: .*vae/config\.json"
    ):
        _load(files, tokenizers=str(folder))


def test_tokenizers_not_available_offline(files, monkeypatch):
    import importlib.util
    import shutil

    from lorafuse.models.tiny import TINY_WORDS
    from lorafuse.models.tokenizer import build_t5_tokenizer

    monkeypatch.setattr(flux_parts, "DEFAULT_TOKENIZERS", ("nobody/no-clip", "nobody/no-t5"))
    monkeypatch.setattr(flux_parts, "_config", lambda folder, sub: flux_parts.json.loads(
        (files["tokenizers"] / sub / "config.json").read_text()))  # fmt: skip
    with pytest.raises(
        UserInputError, match=r"tokenizers are not available offline: missing nobody/no-clip .*nobody/no-t5"
    ):
        _load(files, tokenizers=None)
    folder = files["tokenizers"]
    bigger = build_t5_tokenizer([*TINY_WORDS, "zebra", "violin", "teapot"])  # another model's T5 tokenizer
    shutil.rmtree(folder / "tokenizer_2")
    bigger.save_pretrained(folder / "tokenizer_2")
    with pytest.raises(
        UserInputError, match=r"tokenizer for t5xxl .* has \d+ tokens, its embedding \d+ rows"
    ):
        _load(files)
    shutil.rmtree(folder / "tokenizer_2")
    if importlib.util.find_spec("sentencepiece") is None:  # google/t5-v1_1-xxl's files: a SentencePiece model only
        (folder / "tokenizer_2").mkdir()
        (folder / "tokenizer_2" / "spiece.model").write_bytes(b"not read")
        with pytest.raises(UserInputError, match=r"tokenizer_2 \(only spiece\.model, which needs: pip install sentencepiece"):
            _load(files)
        shutil.rmtree(folder / "tokenizer_2")  # a FLUX.1 folder without T5's tokenizer
    with pytest.raises(UserInputError, match=r"missing .*tokenizer_2 \(no tokenizer\.json / spiece\.model\)"):
        _load(files)


def test_real_size_files_fit_the_released_configs():
    """Headers shaped like the released files (flux1-dev, ae, clip_l, t5xxl: built on the meta device, nothing
    read) pass every check with FLUX.1's own configs, and the transformer's keys give back its config."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from tests.flux_disk import vae_to_ldm
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from lorafuse.families.flux import T5_XXL, TRANSFORMER, VAE
    from lorafuse.families.sd15 import CLIP_L

    with init_empty_weights():
        flux = FluxTransformer2DModel(**TRANSFORMER)
        vae = AutoencoderKL(**VAE)
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        t5 = T5EncoderModel(T5Config(**T5_XXL))
    headers = {
        "pretrained_model_name_or_path": transformer_to_bfl(flux.state_dict(), 19, 38),
        "ae": vae_to_ldm(vae.state_dict(), 4),
        "clip_l": {f"text_model.{k.removeprefix('text_model.')}": v for k, v in clip.state_dict().items()},
        "t5xxl": {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
    }
    shapes = {option: {k: tuple(v.shape) for k, v in sd.items()} for option, sd in headers.items()}
    paths = {option: Path(f"{option}.safetensors") for option in shapes}
    models, _ = flux_parts.empty_models(paths, shapes, None)
    config = models["transformer"].config
    assert {k: config[k] for k in TRANSFORMER} == TRANSFORMER


def _cached(cache: Path, repo: str) -> Path:
    """The snapshot folder of `repo` in a Hugging Face cache laid out as huggingface_hub writes it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    return folder / "snapshots" / ("0" * 40)


def test_tokenizers_from_the_local_cache(original, files, tmp_path, monkeypatch):
    """Default: the hub ids' tokenizers from the cache (only their tokenizer files there); or a FLUX.1 repo id
    whose cached snapshot holds tokenizer/, tokenizer_2/ and the configs. Nothing is fetched."""
    import shutil

    import huggingface_hub.constants

    from lorafuse.models.tiny import TINY_WORDS
    from lorafuse.models.tokenizer import build_clip_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    clip_id, t5_id = flux_parts.DEFAULT_TOKENIZERS
    build_clip_tokenizer(TINY_WORDS, _cached(tmp_path / "hub", clip_id))  # vocab.json + merges.txt, as openai's
    original.tokenizer_2.save_pretrained(_cached(tmp_path / "hub", t5_id))
    monkeypatch.setattr(flux_parts, "_config", lambda folder, sub: flux_parts.json.loads(
        (files["tokenizers"] / sub / "config.json").read_text()))  # fmt: skip
    pipe = _load(files, tokenizers=None)
    assert pipe.tokenizer("a red robot").input_ids == original.tokenizer("a red robot").input_ids
    monkeypatch.undo()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    shutil.copytree(files["tokenizers"], _cached(tmp_path / "hub", "someone/flux-tiny"))
    assert torch.equal(_latents(_load(files, tokenizers="someone/flux-tiny")), _latents(original))
    with pytest.raises(
        UserInputError, match="model.tokenizers = someone/absent: no such folder, and not in the local"
    ):
        _load(files, tokenizers="someone/absent")


def test_a_toml_file_names_the_base_for_every_command(original, files, tmp_path, capsys):
    """--base kohya_flux.toml (kohya's flat keys) or a lorafuse training config ([model]) stands for the
    separate files: load_base_pipeline, and through it `lorafuse fuse`, reads only the base keys."""
    import json

    from lorafuse.cli.main import main
    from lorafuse.fusion.synthetic import random_lora
    from lorafuse.lora.io import save_lora

    keys = "\n".join(f'{k} = "{v.as_posix()}"' for k, v in files.items())
    kohya = tmp_path / "kohya_flux.toml"
    kohya.write_text(f"{keys}\nnetwork_dim = 16\nxformers = true\n")
    ours = tmp_path / "ours.toml"
    ours.write_text(f'[model]\n{keys}\n\n[network]\nnetwork_dim = 4\n')
    for spec in (kohya, ours):
        pipe = load_base_pipeline(str(spec))
        assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in original.transformer.state_dict().items())
    content, style = (save_lora(random_lora(original, seed=s, rank=2, scale=0.3), tmp_path / f"{s}.safetensors",
                                format="diffusers", arch="flux") for s in (1, 2))  # fmt: skip
    argv = ["fuse", "--content", str(content), "--style", str(style), "--prompt", "a red car", "--out",
            str(tmp_path / "out"), "--base", str(ours), "--steps", "2", "--no-progress", "--method", "direct"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((tmp_path / "out" / "record.json").read_text())
    assert record["sampling"]["arch"] == "flux" and record["base"] == str(ours)
    (tmp_path / "no_base.toml").write_text('[model]\nae = "ae.safetensors"\n')
    with pytest.raises(UserInputError, match=r"no_base\.toml: a base given as a TOML file needs pretrained_model"):
        load_base_pipeline(str(tmp_path / "no_base.toml"))


def test_inspect_against_a_toml_base(files, tmp_path, capsys):
    """`lorafuse inspect --base kohya_flux.toml`: the separate files' family, at its released shapes, without
    reading a weight (a LoRA made for the real FLUX.1 covers it)."""
    from lorafuse.cli.main import main
    from lorafuse.lora.io import save_lora
    from lorafuse.lora.state import LoraModule, LoraState

    spec = tmp_path / "kohya_flux.toml"
    spec.write_text("\n".join(f'{k} = "{v.as_posix()}"' for k, v in files.items()))
    g = torch.Generator().manual_seed(0)
    real = {f"transformer.transformer_blocks.0.attn.{n}": LoraModule(torch.randn(2, 3072, generator=g),
            torch.randn(3072, 2, generator=g)) for n in ("to_q", "to_k")}  # fmt: skip
    lora = save_lora(LoraState(modules=real), tmp_path / "real.safetensors", arch="flux")
    assert main(["inspect", str(lora), "--base", str(spec)]) == 0
    assert f"coverage against {spec}: 2 of 2 modules (100.0%)" in capsys.readouterr().out
