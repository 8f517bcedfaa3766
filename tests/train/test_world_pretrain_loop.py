"""The pretraining loop runs, checkpoints and resumes (a few steps of the real loop, never a real retrain)."""

import numpy as np
from diffusers import StableDiffusionPipeline

from lorafuse.train.world_pretrain import PretrainConfig, cache_latents, export, train_unet, train_vae
from lorafuse.world.catalog import SEEN_STYLES, all_individuals
from lorafuse.world.pool import render_pool


def test_pretrain_stages_run_checkpoint_and_resume(tmp_path, capsys):
    pool = render_pool(8, all_individuals(held_out=False)[:4], list(SEEN_STYLES[:2]), seed=0, progress=False)
    cfg = PretrainConfig(work_dir=str(tmp_path), vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4,
                         ckpt_every=2, eval_every=10**9, warmup=1)
    vae = train_vae(cfg, pool)
    assert (tmp_path / "vae_final.safetensors").exists()
    latents, scale = cache_latents(cfg, vae, pool)
    assert latents.shape == (8, 4, 16, 16) and np.isfinite(scale) and scale > 0
    train_unet(cfg, pool, latents, scale)
    assert (tmp_path / "unet_ckpt" / "random_states_0.pkl").exists()  # accelerate's save_state folder

    cfg.unet_steps = 3
    train_unet(cfg, pool, latents, scale)
    assert "resumed at step 2" in capsys.readouterr().out


def test_export_is_a_plain_diffusers_folder(tmp_path):
    pool = render_pool(4, all_individuals(held_out=False)[:2], ["flat"], seed=0, progress=False)
    cfg = PretrainConfig(work_dir=str(tmp_path), vae_steps=1, vae_batch=2, unet_steps=1, unet_batch=2, warmup=1)
    vae = train_vae(cfg, pool)
    latents, scale = cache_latents(cfg, vae, pool)
    train_unet(cfg, pool, latents, scale)
    # rebuild the EMA objects the way train_unet does, through its own export on a fresh run
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTokenizer

    from lorafuse.models.world import fresh_components

    tok = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    comps = fresh_components(tok)
    ema, ema_te = EMAModel(comps["unet"].parameters()), EMAModel(comps["text_encoder"].parameters())
    export(cfg, comps["unet"], comps["text_encoder"], ema, ema_te, vae, tok, scale, tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")  # plain diffusers, no lorafuse code
    assert (tmp_path / "pipe" / "tokenizer" / "vocab.json").exists()
    assert (tmp_path / "pipe" / "tokenizer" / "merges.txt").exists()
    out = pipe("a photo of a teapot", num_inference_steps=2, height=64, width=64, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
    assert abs(pipe.vae.config.scaling_factor - scale) < 1e-6


def test_caption_finetune_starts_from_stage_3_and_drops_colours(tmp_path, capsys):
    from safetensors.torch import load_file

    from lorafuse.train.world_pretrain import _captions, finalize, unet_stages
    from lorafuse.world.catalog import COLOURS

    pool = render_pool(6, all_individuals(held_out=False)[:3], list(SEEN_STYLES[:2]), seed=0, progress=False)
    plain = _captions(pool, with_colour=False)
    assert not any(c in text.split() for text in plain for c in COLOURS)
    assert all(any(c in text for c in COLOURS) for text in _captions(pool))

    cfg = PretrainConfig(work_dir=str(tmp_path), vae_steps=1, vae_batch=2, unet_steps=2, unet_batch=2, warmup=1,
                         caption_ft_steps=0, ckpt_every=1)
    vae = train_vae(cfg, pool)
    latents, scale = cache_latents(cfg, vae, pool)
    stage3, = unet_stages(cfg)
    train_unet(cfg, pool, latents, scale, vae=vae, stage=stage3)
    assert (tmp_path / "eval_pipeline" / "model_index.json").exists()  # exported without an oracle too

    # a 3b stage of zero steps exports exactly what it started from: stage 3's EMA weights
    cfg.caption_ft_steps = 0
    start = unet_stages(PretrainConfig(work_dir=str(tmp_path), caption_ft_steps=1))[1]
    from dataclasses import replace

    train_unet(cfg, pool, latents, scale, vae=vae, stage=replace(start, steps=0))
    name = "unet/diffusion_pytorch_model.safetensors"
    before, after = load_file(str(tmp_path / "eval_pipeline" / name)), load_file(
        str(tmp_path / "eval_pipeline_caption_ft" / name))
    assert all((before[k] == after[k]).all() for k in before)

    # a real 3b step moves the weights, checkpoints under its own name, and finalize ships the last stage
    shutil_rm = __import__("shutil").rmtree
    shutil_rm(tmp_path / "eval_pipeline_caption_ft")
    cfg.caption_ft_steps = 2
    stage3b = unet_stages(cfg)[1]
    train_unet(cfg, pool, latents, scale, vae=vae, stage=replace(stage3b, steps=1))
    train_unet(cfg, pool, latents, scale, vae=vae, stage=stage3b)
    assert "caption_ft: resumed at step 1" in capsys.readouterr().out
    assert (tmp_path / "caption_ft_ckpt" / "random_states_0.pkl").exists()
    shipped = finalize(cfg, tmp_path / "base")
    final = load_file(str(shipped / name))
    assert any(not (before[k] == final[k]).all() for k in before)
    assert StableDiffusionPipeline.from_pretrained(shipped).unet is not None


def test_pretrain_resume_is_bit_exact(tmp_path, monkeypatch):
    """A run killed after its step-1 checkpoint and resumed ends with the weights of an uninterrupted run."""
    import shutil

    import pytest
    import torch

    from lorafuse.train import world_pretrain as pretrain

    pool = render_pool(4, all_individuals(held_out=False)[:2], ["flat"], seed=0, progress=False)
    straight, killed = tmp_path / "a", tmp_path / "b"
    cfg = PretrainConfig(work_dir=str(straight), vae_steps=1, vae_batch=2, unet_steps=2, unet_batch=2, warmup=2,
                         ckpt_every=1)
    vae = train_vae(cfg, pool)
    latents, scale = cache_latents(cfg, vae, pool)
    torch.manual_seed(0)  # the fresh UNet's initial weights
    train_unet(cfg, pool, latents, scale)

    class Killed(Exception):
        pass

    draws, draw = [], pretrain.DDPMObjective.draw

    def dies_at_step_2(self, x0, generator):
        if draws:
            raise Killed
        draws.append(1)
        return draw(self, x0, generator)

    killed.mkdir()
    shutil.copytree(straight / "tokenizer", killed / "tokenizer")
    cfg_b = PretrainConfig(**{**cfg.__dict__, "work_dir": str(killed)})
    monkeypatch.setattr(pretrain.DDPMObjective, "draw", dies_at_step_2)
    torch.manual_seed(0)
    with pytest.raises(Killed):
        train_unet(cfg_b, pool, latents, scale)
    monkeypatch.undo()
    train_unet(cfg_b, pool, latents, scale)
    for i in range(2):  # the UNet's and the text encoder's state dicts
        a, b = (torch.load(d / "unet_ckpt" / f"custom_checkpoint_{i}.pkl", weights_only=True) for d in (straight, killed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
