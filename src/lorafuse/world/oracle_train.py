"""Train the oracle encoders on a pool of renders with known factors.

Augmentations mimic what generated images do to renders (blur from the VAE, noise, small shifts), so the
oracle judges samples of the base model as it judges clean renders. Blur is only an approximation of the VAE:
the real decoder also shifts colours and thins small parts, so the pool can also hold renders sent through the
base model's own VAE (`decoded_pool`), with their true factors.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lorafuse.utils.atomic import atomic_save_safetensors
from lorafuse.utils.images import to_uint8
from lorafuse.world.catalog import CLASS_NAMES, all_individuals
from lorafuse.world.oracle import OracleModel, to_tensor
from lorafuse.world.pool import Pool


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma < 0.2:
        return x
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k, groups=3)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.transpose(2, 3), groups=3)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur (as a VAE decode does), noise, and up to 3-pixel shifts."""
    sigma = float(torch.rand((), generator=gen)) * 1.3
    x = _gaussian_blur(x, sigma)
    x = x + torch.randn(x.shape, generator=gen) * float(torch.rand((), generator=gen)) * 0.08
    dx, dy = (int(v) for v in torch.randint(-3, 4, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3)).clamp(-1, 1)


@torch.no_grad()
def vae_round_trip(images: np.ndarray, vae, batch: int = 128, progress: bool = False) -> np.ndarray:
    """(N, H, W, 3) uint8 renders -> the same after encode (latent mean) and decode through `vae`, as uint8."""
    out = np.empty_like(images)
    vae = vae.eval()
    for i in tqdm(range(0, len(images), batch), desc="VAE round trips", mininterval=10, disable=not progress):
        y = vae.decode(vae.encode(to_tensor(images[i : i + batch])).latent_dist.mean).sample
        out[i : i + batch] = to_uint8((y.permute(0, 2, 3, 1).float().cpu().numpy() + 1) / 2)  # [-1, 1] -> uint8
    return out


def decoded_pool(pool: Pool, vae, n: int, seed: int = 0, batch: int = 128) -> Pool:
    """`n` renders of `pool` (a random subset) after an encode/decode round trip through `vae`, same factors."""
    idx = np.sort(np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False))
    images = vae_round_trip(pool.images[idx], vae, batch, progress=True)
    return Pool(images, pool.individual[idx], pool.style[idx], pool.caption_template[idx])


def train_oracle(pool: Pool, out: str | Path, steps: int = 1400, batch: int = 96, lr: float = 2e-3,
                 seed: int = 0, init: str | Path | None = None) -> dict:
    """Train from scratch, or continue from the weights file `init` (a fresh LR cycle, e.g. on a larger pool)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = OracleModel()
    if init is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(init)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    class_of = torch.tensor([CLASS_NAMES.index(x.cls) for x in all_individuals()])
    ind = torch.from_numpy(pool.individual).long()
    sty = torch.from_numpy(pool.style).long()
    bar = tqdm(range(steps), desc="oracle", mininterval=5)
    log = {}
    for step in bar:
        idx = torch.randint(0, len(pool), (batch,), generator=gen)
        x = augment(to_tensor(pool.images[idx.numpy()]), gen)
        c, s = model.content(x), model.style(x)
        loss_ind = F.cross_entropy(model.individual_head(c), ind[idx])
        loss_cls = F.cross_entropy(model.class_head(c), class_of[ind[idx]])
        loss_sty = F.cross_entropy(model.style_head(s), sty[idx])
        loss = loss_ind + 0.5 * loss_cls + loss_sty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            log = {"ind": round(loss_ind.item(), 3), "cls": round(loss_cls.item(), 3), "sty": round(loss_sty.item(), 3)}
            bar.set_postfix(log)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"steps": str(steps), "seed": str(seed), "lr": str(lr)}
    if init is not None:
        meta["continued_from"] = Path(init).name
    atomic_save_safetensors(out, state, meta)
    return log


if __name__ == "__main__":  # background job helper: python -m lorafuse.world.oracle_train POOL OUT STEPS
    import sys

    from lorafuse.world.pool import load_pool

    torch.set_num_threads(int(np.clip(torch.get_num_threads(), 1, 2)))
    print(train_oracle(load_pool(sys.argv[1]), sys.argv[2], steps=int(sys.argv[3])))
