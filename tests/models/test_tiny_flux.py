"""flux-tiny: the real FLUX.1 classes and module names at tiny size, both variants, tokenizers built offline."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline

from lorafuse.families.flux import TRANSFORMER
from lorafuse.models.tiny_flux import tiny_flux_pipeline
from lorafuse.models.tokenizer import build_t5_tokenizer


def test_keeps_the_real_module_names_and_classes() -> None:
    pipe = tiny_flux_pipeline()
    names = {n for n, _ in pipe.transformer.named_modules()}
    for name in (
        "transformer_blocks.1.attn.to_add_out", "transformer_blocks.0.ff_context.net.2",
        "single_transformer_blocks.3.proj_mlp", "single_transformer_blocks.0.attn.to_q",
        "time_text_embed.guidance_embedder.linear_1", "context_embedder", "x_embedder",
    ):  # fmt: skip
        assert name in names, name
    assert type(pipe.text_encoder_2).__name__ == "T5EncoderModel"
    assert pipe.transformer.config.in_channels == TRANSFORMER["in_channels"]
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor is not None


def test_schnell_has_no_guidance_embedding_and_no_shift() -> None:
    pipe = tiny_flux_pipeline(schnell=True)
    assert not pipe.transformer.config.guidance_embeds
    assert not any("guidance_embedder" in n for n, _ in pipe.transformer.named_modules())
    assert not pipe.scheduler.config.use_dynamic_shifting


def test_same_seed_same_weights_and_diffusers_runs_it() -> None:
    a, b = tiny_flux_pipeline(3), tiny_flux_pipeline(3)
    for (n, p), (_, q) in zip(a.transformer.state_dict().items(), b.transformer.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    a.set_progress_bar_config(disable=True)
    out = a("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
            generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert isinstance(a, FluxPipeline) and out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_t5_tokenizer_words_are_single_tokens_and_any_text_tokenizes() -> None:
    tok = build_t5_tokenizer(["a", "photo", "of", "sks", "dog"])
    ids = tok("a photo of sks dog").input_ids
    assert len(ids) == 6 and ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of sks dog"
    unknown = tok("zebra").input_ids  # falls back to characters, never to <unk> for letters
    assert tok.unk_token_id not in unknown and len(unknown) > 2
    padded = tok(["dog"], padding="max_length", max_length=8, return_tensors="pt").input_ids
    assert padded.shape == (1, 8) and padded[0, -1] == 0
