"""Oracle training: a few real steps, continuing from weights, and the VAE round-trip pool."""

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from lorafuse.models.world import vae_config
from lorafuse.world.catalog import SEEN_STYLES, all_individuals
from lorafuse.world.oracle_train import decoded_pool, train_oracle
from lorafuse.world.pool import render_pool


def test_decoded_pool_keeps_factors_and_changes_pixels():
    pool = render_pool(10, all_individuals()[:5], list(SEEN_STYLES[:2]), seed=0, progress=False)
    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_config())  # random weights: the round trip must visibly change the images
    out = decoded_pool(pool, vae, n=6, seed=1, batch=4)
    picked = np.sort(np.random.default_rng(1).choice(10, size=6, replace=False))
    assert out.images.shape == (6, 64, 64, 3) and out.images.dtype == np.uint8
    assert (out.individual == pool.individual[picked]).all() and (out.style == pool.style[picked]).all()
    assert (out.caption_template == pool.caption_template[picked]).all()
    assert np.abs(out.images.astype(int) - pool.images[picked].astype(int)).mean() > 5
    # the round trip is the real codec, batch by batch: the same as one call per image
    with torch.no_grad():
        from lorafuse.world.oracle import to_tensor

        x = to_tensor(pool.images[picked[:1]])
        one = vae.decode(vae.encode(x).latent_dist.mean).sample
    one = ((one.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(one[0].astype(int) - out.images[0].astype(int)).max() <= 1
    assert len(decoded_pool(pool, vae, n=50, batch=4)) == 10  # never more than the pool holds


def test_train_oracle_continues_from_weights(tmp_path):
    pool = render_pool(8, all_individuals()[:4], list(SEEN_STYLES[:2]), seed=0, progress=False)
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    train_oracle(pool, first, steps=2, batch=4)
    train_oracle(pool, second, steps=1, batch=4, lr=1e-3, init=first)
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # it trained
    from safetensors import safe_open

    with safe_open(str(second), "pt") as f:
        assert f.metadata()["continued_from"] == "a.safetensors"
