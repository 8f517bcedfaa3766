"""examples/character_style: every TOML there loads as the config it claims to be, with the seed's axes."""

from pathlib import Path

import pytest

from lorafuse.eval.grid_config import load_grid_config
from lorafuse.train.config import load_train_config

FOLDER = Path(__file__).resolve().parents[1] / "examples" / "character_style"


@pytest.mark.parametrize("name", ["character_lora", "style_lora"])
def test_training_configs_load(name):
    cfg = load_train_config(FOLDER / f"{name}.toml")
    assert cfg.model.pretrained_model_name_or_path == "world"
    assert str(cfg.training.output_dir) == "out/character_style"


def test_character_lora_is_the_seed_recipe():
    cfg = load_train_config(FOLDER / "character_lora.toml")
    assert cfg.training.save_every_n_epochs == 1 and cfg.training.max_train_epochs == 4  # lora-1..lora-4
    assert cfg.loss.loss_type == "huber" and cfg.loss.huber_schedule == "snr"
    assert cfg.scheduler.lr_scheduler == "cosine_with_restarts"


def test_grids_load_with_the_seed_axes():
    weights = load_grid_config(FOLDER / "grid_weight_epoch_steps.toml")
    assert weights.axes.lora_weight == [0.0, 0.25, 0.5, 0.75, 1.0] and len(weights.axes.checkpoint) == 4
    mix = load_grid_config(FOLDER / "grid_mix_style.toml")
    assert mix.axes.lora_weight == mix.axes.style_weight == [1.0] and mix.axes.style_checkpoint
    bases = load_grid_config(FOLDER / "grid_bases.toml")
    assert len(bases.axes.base) == 3 and bases.axes.base[0] == "world"


def test_sd15_overrides_apply():
    cfg = load_train_config(FOLDER / "character_lora.toml", {"model.pretrained_model_name_or_path": "/models/sd15",
                                                               "dataset.resolution": "512"})  # fmt: skip
    assert cfg.model.pretrained_model_name_or_path == "/models/sd15" and cfg.dataset.resolution == 512
