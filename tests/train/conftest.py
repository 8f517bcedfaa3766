"""Shared pieces for the training-loop tests: a tiny world dataset and a config that trains in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafuse.world.dataset import write_subject_dataset


@pytest.fixture
def world_dataset(tmp_path) -> Path:
    """tmp/ds/3_sks robot/ with 3 captioned 64x64 renders (9 samples per epoch)."""
    write_subject_dataset("robot_09", tmp_path / "ds", n=3, repeats=3)
    return tmp_path / "ds"


@pytest.fixture
def train_overrides(world_dataset, tmp_path):
    """overrides(**extra) -> CLI-style overrides for a few-step run on the random-weight world model."""

    def make(**extra: object) -> dict[str, str]:
        base = {
            "model.pretrained_model_name_or_path": "world-random",
            "dataset.train_data_dir": str(world_dataset),
            "dataset.resolution": "64",
            "network.network_dim": "4",
            "network.network_alpha": "4",
            "optimizer.learning_rate": "1e-3",
            "training.max_train_steps": "4",
            "training.train_batch_size": "2",
            "training.output_dir": str(tmp_path / "out"),
            "training.output_name": "run",
        }
        base.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in extra.items()})
        return base

    return make
