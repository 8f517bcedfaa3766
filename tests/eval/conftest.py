"""Shared pieces for the grid and report tests: the random-weight world pipeline, LoRA files that really change
its output, a random-weight oracle, and a small finished grid run. (Test modules import nothing from here:
tests run with --import-mode=importlib, so helpers are fixtures.)"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import (
    BitImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTImageProcessorPil,
    ViTModel,
)

from lorafuse.fusion.synthetic import random_lora
from lorafuse.lora.io import save_lora
from lorafuse.models.load import load_base_pipeline
from lorafuse.models.tokenizer import build_clip_tokenizer
from lorafuse.world.oracle import Oracle, OracleModel

PROMPT = "a photo of a sks teapot, in ink style"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VIT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)

# Tiny random CLIP / DINO folders saved as a user would have them: model, image processor (and tokenizer).


@pytest.fixture(scope="session")
def world():
    return load_base_pipeline("world-random")


@pytest.fixture(scope="session")
def lora_files(world, tmp_path_factory):
    """Three LoRA files: 'epoch1', 'epoch2' (content, as a trainer's checkpoints) and 'style'."""
    folder = tmp_path_factory.mktemp("loras")
    files = {}
    for seed, name in ((1, "epoch1"), (2, "epoch2"), (3, "style")):
        state = random_lora(world, seed=seed, scale=0.2)
        files[name] = save_lora(state, folder / f"{name}.safetensors", arch="world", base=world)
    return files


@pytest.fixture(scope="session")
def oracle():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Oracle(OracleModel())


@pytest.fixture(scope="session")
def write_config(lora_files):
    """write_config(folder, axes_toml, extra_toml="") -> path of a grid TOML next to copies-free LoRA paths."""

    def write(folder, axes: str, extra: str = "", metrics: str = 'individual = "teapot_08"\nstyle = "ink"\n'):
        folder.mkdir(parents=True, exist_ok=True)
        text = f'prompt = "{PROMPT}"\n{extra}\n[axes]\nbase = ["world-random"]\n{axes}\n[metrics]\n{metrics}'
        for name, path in lora_files.items():
            text = text.replace(f"@{name}", str(path))
        path = folder / "grid.toml"
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session")
def finished_grid(world, oracle, write_config, tmp_path_factory):
    """A 2 x 2 single-LoRA grid (checkpoint x LoRA weight, 2 steps) already run: its result."""
    from lorafuse.eval.grid import run_grid
    from lorafuse.eval.grid_config import load_grid_config

    folder = tmp_path_factory.mktemp("grid")
    path = write_config(folder, 'checkpoint = ["@epoch1", "@epoch2"]\nlora_weight = [0.0, 1.0]\nsteps = [2]')
    return run_grid(load_grid_config(path), oracle=oracle, progress=False, pipes={"world-random": world})


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    tok = build_clip_tokenizer(["a", "photo", "of", "teapot", "in", "ink", "style", "sks", "red"], folder)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=VIT, projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="session")
def vit_dir(tmp_path_factory):
    """DINO v1 layout: ViTModel with a (random, never to be used) pooler, square resize, ImageNet statistics."""
    folder = tmp_path_factory.mktemp("dino")
    torch.manual_seed(1)
    ViTModel(ViTConfig(**VIT), add_pooling_layer=True).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                         resample=Image.BICUBIC).save_pretrained(folder)  # fmt: skip
    return folder


@pytest.fixture(scope="session")
def dinov2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(2)
    Dinov2Model(Dinov2Config(**VIT)).save_pretrained(folder)
    BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, image_mean=IMAGENET_MEAN,
                         image_std=IMAGENET_STD, resample=Image.BICUBIC).save_pretrained(folder)  # fmt: skip
    return folder
