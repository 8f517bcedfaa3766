"""kohya's save options: the dtype of LoRA files (save_precision) and keeping only the newest saves
(save_last_n_epochs / save_last_n_steps and their _state twins).

Rules, as kohya's train_network.py:
- save_last_n_epochs = N: after each epoch save, only the newest N epoch files remain;
- save_last_n_steps = N: after each step save at step s, step files of steps < s - N are deleted, i.e. what
  remains covers the last N steps.
The final file (NAME.safetensors) is never deleted.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_dtype(save_precision: str) -> torch.dtype:
    return SAVE_DTYPES[save_precision]


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@dataclass
class SaveRotation:
    """The saves of one kind (LoRA files or state folders) written by this run, pruned as kohya prunes them."""

    last_n_epochs: int | None = None
    last_n_steps: int | None = None
    epoch_saves: list[tuple[int, Path]] = field(default_factory=list)
    step_saves: list[tuple[int, Path]] = field(default_factory=list)

    def add_epoch(self, epoch: int, path: Path) -> list[Path]:
        """Record an epoch save; delete and return the ones that fall out of the last N."""
        self.epoch_saves.append((epoch, path))
        if self.last_n_epochs is None or len(self.epoch_saves) <= self.last_n_epochs:
            return []
        gone = [p for _, p in self.epoch_saves[: -self.last_n_epochs]]
        self.epoch_saves = self.epoch_saves[-self.last_n_epochs :]
        for p in gone:
            _remove(p)
        return gone

    def add_step(self, step: int, path: Path) -> list[Path]:
        """Record a step save; delete and return those older than the last N steps."""
        self.step_saves.append((step, path))
        if self.last_n_steps is None:
            return []
        gone = [p for s, p in self.step_saves if s < step - self.last_n_steps]
        self.step_saves = [(s, p) for s, p in self.step_saves if s >= step - self.last_n_steps]
        for p in gone:
            _remove(p)
        return gone


def check_implemented(cfg) -> None:
    """Settings the config accepts whose training code has not landed yet: one clear error, never ignored."""
    from lorafuse.errors import UserInputError

    pending: list[str] = []  # none in this version; a setting the config accepts before its code lands goes here
    if pending:
        raise UserInputError(f"not implemented in this version of lorafuse yet: {', '.join(pending)}")
