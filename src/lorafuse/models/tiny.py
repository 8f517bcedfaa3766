"""Tiny random-weight SD1.5 and SDXL pipelines with the real architectures, for fast offline tests.

Like diffusers' `get_dummy_components`, each component is the real class built from the real config with small
widths, so module names, block types, conv-vs-linear projections and the SDXL "text_time" conditioning are those
of the released checkpoints. Depths that decide module names stay real: `layers_per_block=2` in both UNets
(`down_blocks.0.attentions.1`, `up_blocks.3.attentions.2` exist for SD1.5), and SDXL keeps
`transformer_layers_per_block > 1` so `transformer_blocks.1` exists. Only widths shrink (320 -> 32).

Text encoder module names in transformers 5 (checked against 5.23; code that maps LoRA keys depends on this):
  - `CLIPTextModel` (SD1.5's text encoder, SDXL's `text_encoder`) has NO `text_model.` level any more. Its
    modules are `embeddings.token_embedding`, `encoder.layers.0.self_attn.q_proj`, `encoder.layers.0.mlp.fc1`,
    `final_layer_norm`. `save_pretrained` writes keys without the prefix; `from_pretrained` still loads old
    checkpoints whose keys start with `text_model.` (a `PrefixChange` rule in transformers' conversion_mapping).
    Kohya keys like `lora_te_text_model_encoder_layers_0_self_attn_q_proj` therefore name module
    `encoder.layers.0.self_attn.q_proj` (diffusers' LoRA loader strips `text_model.` for the same reason).
  - `CLIPTextModelWithProjection` (SDXL's `text_encoder_2`) keeps it: it wraps a `CLIPTextModel` as
    `text_model`, so its modules are `text_model.encoder.layers.0.self_attn.q_proj` plus `text_projection`.

Notation: "sd15" is Stable Diffusion 1.5, "sdxl" is SDXL base 1.0. Real values are given in comments.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lorafuse.errors import UserInputError
from lorafuse.models.tokenizer import build_clip_tokenizer

ARCHS = ("sd15", "sdxl")

# Every word here is one token, as common prompt words are in CLIP's real vocabulary (including "sks").
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "photo", "picture", "painting", "drawing", "of", "in", "on", "with", "and", "style",
    "sks", "dog", "cat", "person", "man", "woman", "car", "house", "tree", "beach", "city", "forest",
    "red", "blue", "green", "yellow", "black", "white", "watercolor", "oil", "sketch", "cartoon", "pixel",
    "art", "high", "quality", "detailed", "blurry", "low", ",", ".",
)  # fmt: skip

# SDXL's extra conditioning is 6 numbers (original size, crop top-left, target size), each embedded to
# `addition_time_embed_dim` features and concatenated with text_encoder_2's pooled projection.
_SDXL_TIME_IDS = 6
_SDXL_TIME_EMBED_DIM = 8  # real: 256
_TE1_HIDDEN = 32  # real ViT-L/14 text tower: 768
_TE2_HIDDEN = 64  # real OpenCLIP bigG text tower: 1280; differs from te1 so a swapped encoder fails loudly


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise UserInputError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")


def unet_config(arch: str) -> dict[str, Any]:
    """Keyword arguments of `UNet2DConditionModel` for the tiny `arch` UNet (a fresh dict each call)."""
    _check_arch(arch)
    if arch == "sd15":
        return {
            "sample_size": 8,  # latent size -> 64 px default images (real: 64 -> 512 px)
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": (32, 32, 64, 64),  # real: (320, 640, 1280, 1280)
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "attention_head_dim": 8,  # as real; diffusers reads it as the number of heads for SD1.5
            "cross_attention_dim": _TE1_HIDDEN,  # real: 768
            "norm_num_groups": 32,
            "use_linear_projection": False,  # SD1.5 proj_in/proj_out are 1x1 convs; LoRA shapes depend on it
        }
    return {
        "sample_size": 8,  # real: 128 -> 1024 px
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (32, 64, 64),  # real: (320, 640, 1280)
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (2, 4, 4),  # heads per level; real: (5, 10, 20)
        "transformer_layers_per_block": (1, 2, 2),  # real: (1, 2, 10)
        "cross_attention_dim": _TE1_HIDDEN + _TE2_HIDDEN,  # both encoders' states concatenated; real: 2048
        "norm_num_groups": 32,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": _SDXL_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": _SDXL_TIME_IDS * _SDXL_TIME_EMBED_DIM
        + _TE2_HIDDEN,  # real: 2816
    }


def vae_config(arch: str) -> dict[str, Any]:
    """Keyword arguments of `AutoencoderKL`: four levels as real, so the latent is 1/8 of the image size."""
    _check_arch(arch)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (32, 32, 64, 64),  # real: (128, 256, 512, 512)
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 64,
        # The scaling factors are the real ones: code that hard-codes them must agree with the config.
        "scaling_factor": 0.18215 if arch == "sd15" else 0.13025,
        "force_upcast": arch == "sdxl",
    }


def scheduler_config(arch: str) -> dict[str, Any]:
    """The released scheduler configs: PNDM for SD1.5, Euler for SDXL, both scaled_linear 0.00085-0.012."""
    _check_arch(arch)
    common = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }
    if arch == "sd15":
        return {**common, "skip_prk_steps": True, "set_alpha_to_one": False}
    return {
        **common,
        "timestep_spacing": "leading",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
    }


def text_encoder_configs(arch: str, tokenizers: list[CLIPTokenizer]) -> list[CLIPTextConfig]:
    """One config per text encoder; token ids and vocabulary size come from the matching tokenizer."""
    _check_arch(arch)
    shapes = [(_TE1_HIDDEN, "quick_gelu")]  # OpenAI ViT-L/14 uses quick_gelu
    if arch == "sdxl":
        shapes.append((_TE2_HIDDEN, "gelu"))  # OpenCLIP bigG uses exact gelu
    if len(tokenizers) != len(shapes):
        raise UserInputError(
            f"{arch} has {len(shapes)} text encoders but {len(tokenizers)} tokenizers were given"
        )
    return [
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,  # real: 4x
            num_hidden_layers=2,  # real: 12 and 32; two so SDXL's "penultimate layer" differs from the last
            num_attention_heads=4,
            max_position_embeddings=tok.model_max_length,
            hidden_act=act,
            projection_dim=hidden,
            bos_token_id=tok.bos_token_id,
            # The pooled output is read at the first eos id, so it must be the tokenizer's real eos id.
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        for tok, (hidden, act) in zip(tokenizers, shapes, strict=True)
    ]


def seeded(seed: int, build: Callable[[], torch.nn.Module]) -> Any:
    # fork_rng: building a tiny model must not shift the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # eval(): a pipeline loaded with from_pretrained is in eval mode, so the tiny one is too.
        return build().eval()


def tiny_unet(arch: str, seed: int = 0) -> UNet2DConditionModel:
    """Only the UNet of the tiny `arch` pipeline (the same weights as in `tiny_pipeline(arch, seed)`)."""
    return seeded(seed, lambda: UNet2DConditionModel(**unet_config(arch)))


def _tokenizers(arch: str, words: Iterable[str]) -> list[CLIPTokenizer]:
    words = list(words)
    # SDXL's second tokenizer pads with "!" (id 0), unlike the first; keep that difference.
    pads = ["<|endoftext|>"] if arch == "sd15" else ["<|endoftext|>", "!"]
    with tempfile.TemporaryDirectory(prefix="lorafuse-tok-") as tmp:
        return [build_clip_tokenizer(words, Path(tmp) / str(i), pad_token=pad) for i, pad in enumerate(pads)]


def tiny_sd15_pipeline(seed: int = 0, words: Iterable[str] = TINY_WORDS) -> StableDiffusionPipeline:
    """A random-weight SD1.5 pipeline (UNet, VAE, CLIPTextModel, tokenizer, PNDM) that runs in well under a second."""
    (tokenizer,) = _tokenizers("sd15", words)
    (te_config,) = text_encoder_configs("sd15", [tokenizer])
    return StableDiffusionPipeline(
        vae=seeded(seed, lambda: AutoencoderKL(**vae_config("sd15"))),
        text_encoder=seeded(seed, lambda: CLIPTextModel(te_config)),
        tokenizer=tokenizer,
        unet=tiny_unet("sd15", seed),
        scheduler=PNDMScheduler.from_config(scheduler_config("sd15")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0, words: Iterable[str] = TINY_WORDS) -> StableDiffusionXLPipeline:
    """A random-weight SDXL base pipeline with both text encoders and the text_time conditioning."""
    tokenizer, tokenizer_2 = _tokenizers("sdxl", words)
    te_config, te2_config = text_encoder_configs("sdxl", [tokenizer, tokenizer_2])
    return StableDiffusionXLPipeline(
        vae=seeded(seed, lambda: AutoencoderKL(**vae_config("sdxl"))),
        text_encoder=seeded(seed, lambda: CLIPTextModel(te_config)),
        text_encoder_2=seeded(seed, lambda: CLIPTextModelWithProjection(te2_config)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=tiny_unet("sdxl", seed),
        scheduler=EulerDiscreteScheduler.from_config(scheduler_config("sdxl")),
        force_zeros_for_empty_prompt=True,  # as the released SDXL base config
        add_watermarker=False,  # the invisible watermark would make outputs depend on an optional package
    )


_BUILDERS: dict[str, Callable[..., DiffusionPipeline]] = {
    "sd15": tiny_sd15_pipeline,
    "sdxl": tiny_sdxl_pipeline,
}


def tiny_pipeline(arch: str, seed: int = 0) -> DiffusionPipeline:
    """`tiny_sd15_pipeline` or `tiny_sdxl_pipeline` by name ("sd15" or "sdxl"); FLUX.1 is in `models.tiny_flux`."""
    _check_arch(arch)
    return _BUILDERS[arch](seed)
