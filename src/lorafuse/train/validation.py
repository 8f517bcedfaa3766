"""Validation loss (kohya's validation_split): held-out training images, scored every N steps on the same noise
and the same timesteps each time, so the curve moves only with the LoRA and is comparable across runs.

- Split: round(validation_split x images) of the training images (not regularisation images), at least one,
  chosen by a permutation seeded with validation_seed (the training seed when unset); they never train.
- Each evaluation: every held-out image, centre crop, no flip, its caption as written (no shuffle or dropout),
  at the fixed timesteps T_k = t_min + (k + 1/2)(t_max - t_min) / K, K = 4, with noise drawn from a generator
  seeded afresh (validation_seed) each time; the loss is the training loss (same type, min-SNR and Huber
  settings), averaged over images and timesteps. LoRA dropout is off; the training random streams are untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from lorafuse.errors import UserInputError
from lorafuse.train.data import Augment, DatasetIndex, TrainDataset, collate_batch, epoch_batches

NUM_TIMESTEPS = 4  # fixed timesteps per image and evaluation


def split_validation(
    index: DatasetIndex, fraction: float, seed: int
) -> tuple[DatasetIndex, DatasetIndex | None]:
    """(training index without the held-out images, held-out index) or (index, None) when fraction is 0."""
    if not fraction:
        return index, None
    train = [i for i, it in enumerate(index.items) if not it.is_reg]
    n_val = min(max(round(fraction * len(train)), 1), len(train) - 1)
    if n_val < 1:
        raise UserInputError(
            f"dataset.validation_split = {fraction}: needs at least 2 training images, found {len(train)}"
        )
    held = {train[j] for j in np.random.default_rng([seed, 7]).permutation(len(train))[:n_val]}
    keep = [it for i, it in enumerate(index.items) if i not in held]
    # held-out items count once per evaluation, with no augmentation
    val_items = [it for i, it in enumerate(index.items) if i in held]
    val_items = [replace(it, repeats=1, is_reg=False, subset=0) for it in val_items]
    rest = DatasetIndex(index.config, keep, index.skipped, index.augments)
    return rest, DatasetIndex(index.config, val_items, [], [Augment()])


def fixed_timesteps(t_min: int, t_max: int, k: int = NUM_TIMESTEPS) -> list[int]:
    return [int(t_min + (j + 0.5) * (t_max - t_min) / k) for j in range(k)]


@dataclass
class Validator:
    """Scores the held-out images; `prepare` once (before the VAE may be released), `evaluate` every N steps."""

    index: DatasetIndex
    batch_size: int
    seed: int
    t_min: int = 0
    t_max: int = 1000
    batches: list[dict] = field(default_factory=list)

    def prepare(
        self,
        encode_latents: Callable[[torch.Tensor], torch.Tensor],
        encode_text: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """Latents (unscaled posterior mean) of every held-out image, batched by bucket; with `encode_text`
        (frozen text encoders) also the text-encoder outputs, else they are computed at each evaluation."""
        data = TrainDataset(self.index, self.seed)
        with torch.no_grad():
            for ids in epoch_batches(self.index, self.batch_size, self.seed, 0):
                batch = collate_batch([data[(0, sid)] for sid in ids])
                batch["latents"] = encode_latents(batch.pop("pixel_values")).cpu()
                if encode_text is not None:
                    batch["text"] = {k: v.cpu() for k, v in encode_text(batch["caption"]).items()}
                self.batches.append(batch)

    @torch.no_grad()
    def evaluate(self, loss_of: Callable[[dict, torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
        """Mean of `loss_of(batch, timesteps, noise)` over batches and the fixed timesteps; the caller noises the
        batch's latents with `noise` at `timesteps` and returns the batch's mean loss."""
        generator = torch.Generator().manual_seed(self.seed)
        total, count = 0.0, 0
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            for batch in self.batches:
                latents = batch["latents"]
                for t in fixed_timesteps(self.t_min, self.t_max):
                    noise = torch.randn(latents.shape, generator=generator)
                    timesteps = torch.full((latents.shape[0],), t, dtype=torch.long)
                    loss = loss_of(batch, timesteps, noise)
                    total += float(loss) * latents.shape[0]
                    count += latents.shape[0]
        return total / count
