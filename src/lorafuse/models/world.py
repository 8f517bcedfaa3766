"""The built-in base model: a tiny Stable-Diffusion-architecture pipeline sized for a 2-core CPU.

Layout mirrors SDXL's UNet at tiny scale (down: DownBlock2D, CrossAttnDownBlock2D x2; up: CrossAttnUpBlock2D x2,
UpBlock2D), so SDXL layer names such as `up_blocks.0.attentions.0/1` (B-LoRA) exist here too. Attention runs
only at 8x8 and 4x4 latents: attention at the highest resolution is what costs on a CPU.
64x64 images <-> 16x16x4 latents (VAE with three blocks, i.e. a factor of 4, not SD's 8: 8x8 latents lose the
individuals' small parts).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lorafuse.errors import UserInputError
from lorafuse.models.tokenizer import build_clip_tokenizer
from lorafuse.world.catalog import vocabulary

IMAGE_SIZE = 64
LATENT_SIZE = 16
TEXT_DIM = 128


def vae_config() -> dict[str, Any]:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
    )


def unet_config() -> dict[str, Any]:
    return dict(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=TEXT_DIM, attention_head_dim=(4, 4, 8),  # diffusers reads this as a head count
        transformer_layers_per_block=1,
    )


def text_config(vocab_size: int, eos_token_id: int, bos_token_id: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_DIM,
        eos_token_id=eos_token_id, bos_token_id=bos_token_id, pad_token_id=eos_token_id,
    )


def scheduler_config() -> dict[str, Any]:
    """SD1.5's training noise schedule (scaled_linear 0.00085 -> 0.012, 1000 steps, epsilon prediction)."""
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def world_tokenizer(folder: str | Path) -> CLIPTokenizer:
    return build_clip_tokenizer(vocabulary(), Path(folder))


def fresh_components(tokenizer: CLIPTokenizer) -> dict[str, Any]:
    """Random-weight components of the built-in base model (pretraining starts here)."""
    te_cfg = text_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id)
    return dict(
        vae=AutoencoderKL(**vae_config()),
        unet=UNet2DConditionModel(**unet_config()),
        text_encoder=CLIPTextModel(te_cfg),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**scheduler_config()),
    )


def default_base_path() -> Path:
    return Path(str(resources.files("lorafuse.world") / "assets" / "base"))


def load_world_pipeline(path: str | Path | None = None) -> StableDiffusionPipeline:
    """The shipped base model (or a pipeline folder) as a plain diffusers StableDiffusionPipeline."""
    path = Path(path) if path else default_base_path()
    if not (path / "model_index.json").exists():
        raise UserInputError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
