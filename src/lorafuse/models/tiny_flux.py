"""A tiny random-weight FLUX.1 pipeline with the real architecture, for fast offline tests (like `models.tiny`).

Every component is the real class (`FluxTransformer2DModel`, `AutoencoderKL`, `CLIPTextModel`, `T5EncoderModel`,
`FlowMatchEulerDiscreteScheduler`) built from FLUX.1's configs (`families/flux.py`) with small widths, so module
names (`transformer_blocks.0.attn.add_q_proj`, `single_transformer_blocks.3.proj_mlp`), the 16 latent channels,
2x2 patch packing, RoPE axes, the guidance embedding (dev) and the scheduler's shift are those of the released
models. Depth shrinks too (2 double, 4 single blocks; real 19 and 38): presets that split by depth follow the
model's own block counts. Both tokenizers are built in code; nothing downloads.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from lorafuse.families.flux import SCHEDULER_DEV, SCHEDULER_SCHNELL, VAE
from lorafuse.models.tiny import TINY_WORDS, seeded
from lorafuse.models.tokenizer import build_clip_tokenizer, build_t5_tokenizer

_CLIP_HIDDEN = 32  # real CLIP-L: 768 (FLUX's pooled_projection_dim)
_T5_HIDDEN = 32  # real T5-XXL: 4096 (FLUX's joint_attention_dim)


def transformer_config(schnell: bool = False) -> dict[str, Any]:
    """Keyword arguments of `FluxTransformer2DModel` at tiny size (a fresh dict each call)."""
    return {
        "patch_size": 1,
        "in_channels": 64,  # 16 latent channels x 2x2 patch, as real
        "num_layers": 2,  # double-stream blocks; real: 19
        "num_single_layers": 4,  # single-stream blocks; real: 38
        "attention_head_dim": 16,  # real: 128
        "num_attention_heads": 2,  # real: 24
        "joint_attention_dim": _T5_HIDDEN,
        "pooled_projection_dim": _CLIP_HIDDEN,
        "guidance_embeds": not schnell,
        "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim; real: (16, 56, 56)
    }


def vae_config() -> dict[str, Any]:
    """FLUX.1's VAE (16 latent channels, scaling and shift factors, no quant convs) at tiny width."""
    return {**VAE, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "sample_size": 64}


def t5_config(vocab_size: int) -> T5Config:
    return T5Config(
        vocab_size=vocab_size, d_model=_T5_HIDDEN, d_kv=8, d_ff=2 * _T5_HIDDEN, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip


def tiny_flux_pipeline(seed: int = 0, words: Iterable[str] = TINY_WORDS, schnell: bool = False) -> FluxPipeline:
    """A random-weight FLUX.1 dev pipeline (schnell=True: no guidance embedding, unshifted schedule), 64 px."""
    words = list(words)
    with tempfile.TemporaryDirectory(prefix="lorafuse-tok-") as tmp:
        tokenizer = build_clip_tokenizer(words, Path(tmp) / "clip")
    tokenizer_2 = build_t5_tokenizer(words)
    clip = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=_CLIP_HIDDEN, intermediate_size=2 * _CLIP_HIDDEN,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu", projection_dim=_CLIP_HIDDEN, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    scheduler = SCHEDULER_SCHNELL if schnell else SCHEDULER_DEV
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler),
        vae=seeded(seed, lambda: AutoencoderKL(**vae_config())),
        text_encoder=seeded(seed, lambda: CLIPTextModel(clip)),
        tokenizer=tokenizer,
        text_encoder_2=seeded(seed, lambda: T5EncoderModel(t5_config(len(tokenizer_2)))),
        tokenizer_2=tokenizer_2,
        transformer=seeded(seed, lambda: FluxTransformer2DModel(**transformer_config(schnell))),
    )


def tiny_flux_schnell_pipeline(seed: int = 0, words: Iterable[str] = TINY_WORDS) -> FluxPipeline:
    return tiny_flux_pipeline(seed, words, schnell=True)
