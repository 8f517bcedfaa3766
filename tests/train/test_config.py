import dataclasses
import warnings
from pathlib import Path

import pytest

from lorafuse.config.toml_io import dump_config, load_config, save_config
from lorafuse.errors import ConfigError
from lorafuse.train.config import (
    DatasetConfig,
    LossConfig,
    ModelConfig,
    NetworkConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainConfig,
    TrainingConfig,
    load_train_config,
)

# Seed 002's kohya run (Geralt LoRA): 20 images x 100 repeats, batch 2, 4000 steps, warm-up 10 %.
SEED_002 = """
[model]
pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"
clip_skip = 2

[dataset]
train_data_dir = "data/geralt"
resolution = 512

[network]
network_dim = 128
network_alpha = 64

[optimizer]
optimizer_type = "AdamW8bit"
unet_lr = 1e-4
text_encoder_lr = 5e-5

[scheduler]
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 400
lr_scheduler_num_cycles = 4

[loss]
loss_type = "l2"
huber_c = 0.1
huber_schedule = "snr"

[training]
train_batch_size = 2
max_train_steps = 4000
mixed_precision = "fp16"
save_every_n_epochs = 1
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train.toml"
    path.write_text(text)
    return path


def _custom() -> TrainConfig:
    """Every table away from its defaults, with the awkward types: unions, tuples, Optional paths."""
    return TrainConfig(
        model=ModelConfig("some/model", v_parameterization=True, clip_skip=2),
        dataset=DatasetConfig(
            train_data_dir=Path("d/train"),
            reg_data_dir=Path("d/reg"),
            resolution=768,
            shuffle_caption=True,
            keep_tokens=1,
            caption_extension=".caption",
            enable_bucket=True,
            trigger="sks",
            flip_aug=True,
            cache_latents=True,
            cache_dir=Path("cache"),
            on_bad_image="skip",
            prior_loss_weight=0.5,
        ),
        network=NetworkConfig(
            network_dim=16,
            network_alpha=8.5,
            conv_dim=4,
            conv_alpha=1.0,
            layers=(r"attn\d", "to_k"),
            block_dims=(4,) * 25,
            network_train_unet_only=True,
        ),
        optimizer=OptimizerConfig("Adafactor", learning_rate=3e-4, unet_lr=1e-4, betas=(0.8, 0.99)),
        scheduler=SchedulerConfig("cosine_with_restarts", lr_warmup_steps=0.1, lr_scheduler_num_cycles=4),
        loss=LossConfig(
            "huber",
            huber_c=0.2,
            huber_schedule="exponential",
            min_snr_gamma=5.0,
            noise_offset=0.0357,
            min_timestep=10,
            max_timestep=900,
            timestep_bias="style",
        ),
        training=TrainingConfig(
            max_train_epochs=3,
            train_batch_size=2,
            mixed_precision="bf16",
            seed=7,
            resume=Path("out/state"),
            sample_every_n_epochs=1,
            sample_prompts=("a", "b, c"),
        ),
    )


def test_round_trip_is_equal(tmp_path):
    cfg = _custom()
    assert cfg != TrainConfig(cfg.model, cfg.dataset)  # the custom values really differ from the defaults
    save_config(cfg, tmp_path / "c.toml")
    loaded = load_config(TrainConfig, tmp_path / "c.toml")
    assert loaded == cfg
    assert isinstance(loaded.scheduler.lr_warmup_steps, float) and isinstance(loaded.network.layers, tuple)
    assert dump_config(loaded) == dump_config(cfg)


def test_round_trip_keeps_int_warmup_and_preset_layers(tmp_path):
    cfg = TrainConfig(
        ModelConfig("m"),
        DatasetConfig(train_data_dir=Path("d")),
        scheduler=SchedulerConfig("linear", lr_warmup_steps=400),
    )
    save_config(cfg, tmp_path / "c.toml")
    loaded = load_config(TrainConfig, tmp_path / "c.toml")
    assert (
        loaded == cfg and type(loaded.scheduler.lr_warmup_steps) is int and loaded.network.layers == "default"
    )


def test_seed_002_config_loads_and_warns_about_inert_huber_options(tmp_path):
    with pytest.warns(UserWarning, match="huber_c / huber_schedule have no effect with loss_type = 'l2'"):
        cfg = load_train_config(_write(tmp_path, SEED_002))
    assert cfg.optimizer.optimizer_type == "AdamW8bit" and cfg.network.network_alpha == 64.0
    assert cfg.model.diffusers_clip_skip == 1  # kohya clip_skip 2 == diffusers clip_skip 1
    assert cfg.training.total_steps(steps_per_epoch=1000) == 4000
    assert cfg.scheduler.warmup_steps(4000) == 400


def test_no_warning_when_huber_options_are_left_out(tmp_path):
    text = SEED_002.replace('huber_c = 0.1\nhuber_schedule = "snr"\n', "")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_train_config(_write(tmp_path, text))
    assert cfg.loss.resolved_huber_c == 0.1 and cfg.loss.resolved_huber_schedule == "snr"


def test_unknown_key_names_file_dotted_key_suggestion_and_allowed_keys(tmp_path):
    path = _write(tmp_path, SEED_002.replace("network_dim = 128", "netwrk_dim = 128"))
    with pytest.raises(ConfigError) as e:
        load_train_config(path)
    msg = str(e.value)
    assert str(path) in msg and "'network.netwrk_dim'" in msg and "(did you mean 'network_dim'?)" in msg
    assert "network_alpha" in msg and "conv_dim" in msg  # the allowed keys are listed


def test_unknown_table_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optimiser' \(did you mean 'optimizer'\?\)"):
        load_train_config(_write(tmp_path, SEED_002 + "\n[optimiser]\nlr = 1\n"))


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("network_dim = 128", 'network_dim = "8"', r"network\.network_dim: expected int, got '8'"),
        ("network_dim = 128", "network_dim = true", r"network\.network_dim: expected int, got True"),
        ("network_dim = 128", "network_dim = 8.5", r"network\.network_dim: expected int, got 8.5"),
        ("clip_skip = 2", "clip_skip = [2]", r"model\.clip_skip: expected int, got \[2\]"),
    ],
)
def test_wrong_type_names_file_key_expected_and_got(tmp_path, old, new, expected):
    path = _write(tmp_path, SEED_002.replace(old, new))
    with pytest.raises(ConfigError, match=expected) as e:
        load_train_config(path)
    assert str(e.value).startswith(str(path))


def test_literal_lists_allowed_values(tmp_path):
    path = _write(tmp_path, SEED_002.replace('loss_type = "l2"', 'loss_type = "l3"'))
    with pytest.raises(ConfigError) as e:
        load_train_config(path)
    assert "loss.loss_type: expected one of 'l2', 'l1', 'huber', 'smooth_l1', got 'l3'" in str(e.value)


def test_validation_error_names_file_and_table(tmp_path):
    path = _write(tmp_path, SEED_002.replace("resolution = 512", "resolution = 500"))
    with pytest.raises(
        ConfigError, match=r"train\.toml: dataset\.resolution: must be a positive multiple of 8"
    ):
        load_train_config(path)


def test_missing_required_key_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'model.pretrained_model_name_or_path'"):
        load_train_config(
            _write(tmp_path, SEED_002.replace('pretrained_model_name_or_path = "runwayml', "#"))
        )
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_train_config(_write(tmp_path, "[model\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_train_config(tmp_path / "nope.toml")


def test_overrides_coerce_strings(tmp_path):
    path = _write(tmp_path, SEED_002.replace('loss_type = "l2"', 'loss_type = "huber"'))
    cfg = load_train_config(
        path,
        {
            "network.network_dim": "8",
            "network.layers": r'["attn\\d", "ff"]',
            "optimizer.betas": "0.8, 0.99",
            "scheduler.lr_warmup_steps": "0.1",
            "dataset.reg_data_dir": "reg",
            "dataset.flip_aug": "true",
            "training.sample_prompts": "a dog",
            "training.max_train_epochs": 2,
            "optimizer.unet_lr": "none",
        },
    )
    assert cfg.network.network_dim == 8 and cfg.network.layers == (r"attn\d", "ff")
    assert cfg.optimizer.betas == (0.8, 0.99) and cfg.optimizer.unet_lr is None
    assert cfg.scheduler.lr_warmup_steps == 0.1 and cfg.dataset.reg_data_dir == Path("reg")
    assert cfg.dataset.flip_aug is True and cfg.training.sample_prompts == ("a dog",)
    assert cfg.training.max_train_epochs == 2
    assert load_train_config(path, {"network.layers": "attn"}).network.layers == "attn"  # a str stays a str


def test_override_errors_name_the_key(tmp_path):
    path = _write(tmp_path, SEED_002)
    with pytest.raises(
        ConfigError,
        match=r"command line: unknown key 'network\.dim' \(did you mean 'block_dims' or 'conv_dim' or 'network_dim'\?\)",
    ):
        load_train_config(path, {"network.dim": "8"})
    with pytest.raises(ConfigError, match=r"network\.network_dim: expected int, got 'eight'"):
        load_train_config(path, {"network.network_dim": "eight"})
    with pytest.raises(ConfigError, match="is a value, not a table"):
        load_train_config(path, {"network.network_dim.x": 1})


def test_cross_table_checks():
    model, ds = ModelConfig("m"), DatasetConfig(train_data_dir=Path("d"), cache_text_encoder_outputs=True)
    with pytest.raises(ConfigError, match="network_train_unet_only"):
        TrainConfig(model, ds)
    shuffled = dataclasses.replace(ds, shuffle_caption=True)
    with pytest.raises(ConfigError, match="dataset.shuffle_caption"):
        TrainConfig(model, shuffled, network=NetworkConfig(network_train_unet_only=True))
    with pytest.raises(ConfigError, match="random_crop"):
        DatasetConfig(train_data_dir=Path("d"), cache_latents=True, random_crop=True)
    with pytest.raises(ConfigError, match="min_bucket_reso, max_bucket_reso"):
        DatasetConfig(train_data_dir=Path("d"), enable_bucket=True, resolution=2048)
    with pytest.raises(ConfigError, match="lr_warmup_steps: as a fraction"):
        SchedulerConfig(lr_warmup_steps=1.5)


def test_str_paths_equal_loaded_paths():
    assert DatasetConfig(train_data_dir="d") == DatasetConfig(train_data_dir=Path("d"))  # type: ignore[arg-type]
