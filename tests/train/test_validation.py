"""Validation loss: held-out images, fixed noise and timesteps, logged beside the training loss; it never changes
the training itself."""

from __future__ import annotations

import math

import pytest

from lorafuse.train.config import load_train_config
from lorafuse.train.loop import train_lora
from lorafuse.train.run_log import read_rows
from lorafuse.train.scan import scan_dataset
from lorafuse.train.validation import fixed_timesteps, split_validation


def test_split_is_seeded_and_disjoint(train_overrides):
    cfg = load_train_config(None, train_overrides(**{"dataset.validation_split": 0.34}))
    index = scan_dataset(cfg.dataset)
    train, val = split_validation(index, 0.34, seed=5)
    again_train, again_val = split_validation(index, 0.34, seed=5)
    assert [it.path for it in val.items] == [it.path for it in again_val.items]
    assert len(val.items) == 1 and len(train.items) == 2  # 3 images
    assert not {it.path for it in val.items} & {it.path for it in train.items}
    assert (
        val.samples == [0] and train.num_train_samples == 6
    )  # held-out images count once; training keeps repeats
    assert split_validation(index, 0.0, seed=5) == (index, None)
    assert fixed_timesteps(0, 1000) == [125, 375, 625, 875]


def test_validation_loss_is_logged_fixed_and_leaves_training_unchanged(train_overrides, tmp_path):
    common = {"dataset.validation_split": 0.34, "training.max_train_steps": 4, "training.train_batch_size": 1}
    with_val = train_lora(
        load_train_config(None, train_overrides(**common, **{"training.validate_every_n_steps": 2})),
        progress_bar=False,
    )
    assert [s for s, _ in with_val.val_losses] == [2, 4]
    assert all(math.isfinite(v) and v > 0 for _, v in with_val.val_losses)
    rows = read_rows(with_val.log_csv)
    assert [r.get("val_loss") for r in rows][1] == pytest.approx(with_val.val_losses[0][1])
    assert "val_loss" not in rows[0]  # only at validation steps
    assert with_val.loss_plot is not None and with_val.loss_plot.is_file()

    # the same run without validation: identical training losses (validation draws from its own generator)
    without = train_lora(
        load_train_config(None, train_overrides(**common, **{"training.output_dir": tmp_path / "b"})),
        progress_bar=False,
    )
    assert without.losses == with_val.losses
    assert [s for s, _ in without.val_losses] == [4]  # unset interval: once, at the end
    assert without.val_losses[0][1] == pytest.approx(
        with_val.val_losses[-1][1], rel=1e-6
    )  # same noise, same t
