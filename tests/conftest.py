"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest
import torch

# A tiny FLUX.1 transformer from diffusers' real class (names and fused layouts are the real ones, widths are
# not: inner dim 16 instead of 3072). Replaced by the `flux-tiny` pipeline once models/ provides it.
FLUX_TINY_CONFIG = dict(
    patch_size=1,
    in_channels=4,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=20,
    guidance_embeds=True,
    axes_dims_rope=(2, 2, 4),
)


def _tiny_flux(seed: int = 0):
    """A FluxPipeline with a tiny transformer and a tiny CLIP-L-architecture text encoder (no VAE, no T5:
    LoRA files target only these two)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**FLUX_TINY_CONFIG)
    te_config = CLIPTextConfig(
        vocab_size=64, hidden_size=20, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=20,
    )  # fmt: skip
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=CLIPTextModel(te_config),
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_flux():
    """tiny_flux(seed=0) -> a new tiny FluxPipeline (transformer + CLIP text encoder)."""
    return _tiny_flux
