"""Tiny SD1.5 / SDXL pipelines: they run, carry the real module names, and round-trip through plain diffusers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from lorafuse.errors import UserInputError
from lorafuse.models.tiny import tiny_pipeline, tiny_unet, unet_config

PIPELINE_CLASS = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def run(pipe: DiffusionPipeline, size: int = 64) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    out = pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        height=size,
        width=size,
        generator=generator,
        output_type="np",
    )
    return out.images


def names(module: torch.nn.Module) -> set[str]:
    return {name for name, _ in module.named_modules()}


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def pipe(arch: str) -> DiffusionPipeline:
    return tiny_pipeline(arch)


@pytest.mark.parametrize("size", [64, 32])
def test_two_steps_give_an_image(arch: str, pipe: DiffusionPipeline, size: int) -> None:
    assert type(pipe) is PIPELINE_CLASS[arch]
    images = run(pipe, size)
    assert images.shape == (1, size, size, 3)
    assert np.isfinite(images).all()


def test_sd15_unet_module_names() -> None:
    unet = names(tiny_unet("sd15"))
    for name in [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "down_blocks.0.attentions.1",  # layers_per_block=2, as SD1.5
        "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
        "up_blocks.1.attentions.0",
        "up_blocks.3.attentions.2.proj_out",  # up blocks have layers_per_block + 1 attentions
    ]:
        assert name in unet, name
    # SD1.5's last down block and first up block have no attention; no block has a second transformer layer.
    assert not any(n.startswith(("down_blocks.3.attentions", "up_blocks.0.attentions")) for n in unet)
    assert not any(".transformer_blocks.1" in n for n in unet)
    assert "add_embedding" not in unet


def test_sdxl_unet_module_names() -> None:
    unet = names(tiny_unet("sdxl"))
    for name in [
        "up_blocks.0.attentions.0",
        "up_blocks.0.attentions.1",
        "up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_v",
        "down_blocks.1.attentions.1.transformer_blocks.1",  # real SDXL has 2 transformer layers here
        "down_blocks.2.attentions.0.transformer_blocks.1.attn1.to_out.0",
        "mid_block.attentions.0.transformer_blocks.1",
        "add_embedding.linear_1",  # the "text_time" conditioning
    ]:
        assert name in unet, name
    assert not any(n.startswith(("down_blocks.0.attentions", "up_blocks.2.attentions")) for n in unet)
    assert "up_blocks.3" not in unet


def test_projection_kinds_match_the_real_models() -> None:
    # LoRA weight shapes differ between conv (SD1.5) and linear (SDXL) proj_in.
    sd15 = tiny_unet("sd15").get_submodule("down_blocks.0.attentions.0.proj_in")
    sdxl = tiny_unet("sdxl").get_submodule("down_blocks.1.attentions.0.proj_in")
    assert isinstance(sd15, torch.nn.Conv2d) and isinstance(sdxl, torch.nn.Linear)


def test_text_encoder_names_in_transformers_5(arch: str, pipe: DiffusionPipeline) -> None:
    # CLIPTextModel is flat (no "text_model." level); CLIPTextModelWithProjection still wraps one as
    # "text_model". The LoRA key mapping relies on exactly this, so pin it here.
    te = names(pipe.text_encoder)
    assert {"embeddings.token_embedding", "encoder.layers.1.self_attn.q_proj", "final_layer_norm"} <= te
    assert not any(n.startswith("text_model") for n in te)
    if arch == "sdxl":
        te2 = names(pipe.text_encoder_2)
        assert {
            "text_model.encoder.layers.1.mlp.fc2",
            "text_model.final_layer_norm",
            "text_projection",
        } <= te2


def test_text_encoders_match_their_tokenizers(arch: str, pipe: DiffusionPipeline) -> None:
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if arch == "sdxl":
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    for tok, te in pairs:
        assert te.config.vocab_size == len(tok)
        assert te.config.eos_token_id == tok.eos_token_id
        assert te.config.max_position_embeddings == tok.model_max_length == 77
    if arch == "sdxl":
        assert pipe.tokenizer_2.pad_token == "!"  # as SDXL's OpenCLIP tokenizer
        hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        assert pipe.unet.config.cross_attention_dim == hidden


def test_save_and_load_with_plain_diffusers(arch: str, pipe: DiffusionPipeline, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is PIPELINE_CLASS[arch]
    for name in ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else []):
        before, after = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert before.keys() == after.keys(), name
        assert all(torch.equal(before[k], after[k]) for k in before), name
    assert type(loaded.scheduler) is type(pipe.scheduler)
    # Weights are equal bit for bit, outputs only to float rounding: tensors loaded from safetensors sit at
    # other memory alignments, and CPU kernels then take other SIMD paths (seen: 1e-7 after one Linear).
    np.testing.assert_allclose(run(loaded), run(pipe), rtol=0, atol=1e-4)


def test_seeds_are_deterministic_and_leave_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, b, c = tiny_unet("sd15", seed=0), tiny_unet("sd15", seed=0), tiny_unet("sd15", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


def test_unet_alone_equals_pipeline_unet(arch: str, pipe: DiffusionPipeline) -> None:
    alone = tiny_unet(arch).state_dict()
    assert all(torch.equal(alone[k], v) for k, v in pipe.unet.state_dict().items())


def test_unet_config_is_a_fresh_dict() -> None:
    unet_config("sd15")["block_out_channels"] = (1,)
    assert unet_config("sd15")["block_out_channels"] == (32, 32, 64, 64)


def test_unknown_arch_names_the_choices() -> None:
    with pytest.raises(UserInputError, match="sd15, sdxl"):
        tiny_pipeline("sd3")
