"""`train_lora` on the random-weight world model and tiny SD1.5 / SDXL: it learns, its files load and validate,
caching and checkpointing change speed but not results, and bad inputs fail early without writing anything."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from lorafuse.config.toml_io import load_config
from lorafuse.errors import ConfigError, UserInputError
from lorafuse.families import get_family
from lorafuse.lora.io import load_lora
from lorafuse.lora.validate import validate_lora
from lorafuse.models.load import load_base_pipeline
from lorafuse.train.cache import encode_latents, text_embeddings
from lorafuse.train.config import TrainConfig, load_train_config
from lorafuse.train.loop import train_lora
from lorafuse.train.run_log import read_rows
from lorafuse.train.scan import scan_dataset


def _run(overrides: dict[str, str]):
    return train_lora(load_train_config(None, overrides), progress_bar=False)


def _merged_pipeline(base: str, lora_path, arch: str):
    """A fresh base with the saved LoRA file's ΔW added to its weights (the slow, obvious way to apply it)."""
    pipe = load_base_pipeline(base)
    state = load_lora(lora_path, base=pipe)
    report = validate_lora(state, pipe, arch=arch)
    with torch.no_grad():
        for key, ref in report.targets.items():
            module = getattr(pipe, ref.component).get_submodule(ref.path)
            module.weight += state.modules[key].delta_weight(module.weight.shape)
    return pipe


def _fixed_loss(pipe, dataset) -> float:
    """ε-MSE on the dataset at fixed timesteps and fixed noise: comparable before and after training."""
    index = scan_dataset(
        load_train_config(None, {**_MINIMAL, "dataset.train_data_dir": str(dataset)}).dataset
    )
    from lorafuse.train.data import image_tensor

    pixels = torch.stack([image_tensor(item, False, None)[0] for item in index.items])
    latents = encode_latents(pipe.vae, pixels) * pipe.vae.config.scaling_factor
    ehs = text_embeddings([pipe.tokenizer], [pipe.text_encoder], [it.caption for it in index.items])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        for t in (100, 300, 500, 700, 900):
            timesteps = torch.full((len(latents),), t)
            noise = torch.randn(latents.shape, generator=g)
            pred = pipe.unet(
                scheduler.add_noise(latents, noise, timesteps), timesteps, ehs["encoder_hidden_states"]
            ).sample
            losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    return sum(losses) / len(losses)


_MINIMAL = {"model.pretrained_model_name_or_path": "world-random"}


def test_a_few_steps_reduce_the_loss(train_overrides, world_dataset, tmp_path):
    result = _run(
        train_overrides(
            **{
                "network.layers": "all",
                "network.network_dim": 8,
                "network.network_alpha": 8,
                "network.network_train_unet_only": True,
                "dataset.cache_latents": True,
                "optimizer.learning_rate": 3e-3,
                "training.train_batch_size": 3,
                "training.max_train_steps": 24,
            }
        )
    )
    before = _fixed_loss(load_base_pipeline("world-random"), world_dataset)
    after = _fixed_loss(_merged_pipeline("world-random", result.lora_path, "world"), world_dataset)
    assert after < 0.9 * before, (before, after)
    assert len(result.losses) == 24 and result.global_step == 24


@pytest.mark.parametrize("base", ["world-random", "sd15-folder", "sdxl-tiny", "flux-tiny"])
def test_saved_file_loads_back_and_validates(base, train_overrides, tmp_path):
    arch = {"world-random": "world", "sd15-folder": "sd15", "sdxl-tiny": "sdxl", "flux-tiny": "flux"}[base]
    if base == "sd15-folder":  # a diffusers folder on disk: the loading path real bases take
        from lorafuse.models.tiny import tiny_pipeline

        tiny_pipeline("sd15").save_pretrained(tmp_path / "sd15")
        base = str(tmp_path / "sd15")
    result = _run(
        train_overrides(**{"model.pretrained_model_name_or_path": base, "training.max_train_steps": 2})
    )
    assert result.arch == arch and result.saved == [result.lora_path]
    pipe = load_base_pipeline(base)
    state = load_lora(result.lora_path, base=pipe)
    report = validate_lora(state, pipe, arch=arch)
    assert not report.unmatched and report.coverage == 1.0
    family = get_family(arch)  # the denoiser and every text encoder the family lets a LoRA train
    assert {k.split(".")[0] for k in state.modules} == {family.denoiser_component, *family.trainable_text_encoders}
    meta = state.metadata
    assert meta["ss_steps"] == "2" and meta["ss_network_dim"] == "4" and meta["ss_num_train_images"] == "9"
    assert json.loads(meta["lorafuse_lr_at_save"]).keys() >= {"unet", "text_encoder"}
    assert "ss_training_finished_at" in meta and json.loads(meta["ss_dataset_dirs"]) == {
        "3_sks robot": {"n_repeats": 3, "img_count": 3}
    }
    # the effective config sits beside the outputs and loads back to the same settings
    assert load_config(TrainConfig, result.config_path) == load_train_config(
        None, train_overrides(**{"model.pretrained_model_name_or_path": base, "training.max_train_steps": 2})
    )
    assert [r["step"] for r in read_rows(result.log_csv)] == [1, 2]
    assert result.loss_plot.stat().st_size > 0


def test_epoch_saves_samples_and_metadata(train_overrides):
    result = _run(
        train_overrides(
            **{
                "training.max_train_epochs": 3,  # 9 samples / batch 2 = 5 steps per epoch
                "training.save_every_n_epochs": 1,
                "training.sample_every_n_epochs": 3,  # the last epoch samples too
                "training.sample_every_n_steps": 4,  # kohya's sample_every_n_steps beside it: steps 4, 8, 12
                "training.sample_prompts": '["a photo of a sks robot", "a red mug, in flat style"]',
                "training.sample_steps": 2,
                "scheduler.lr_scheduler": "cosine_with_restarts",
                "scheduler.lr_scheduler_num_cycles": 2,
                "network.network_train_unet_only": True,
            }
        )
    )
    out = result.lora_path.parent
    assert [p.name for p in result.saved] == [
        "run-000001.safetensors",
        "run-000002.safetensors",
        "run.safetensors",
    ]
    assert result.global_step == 15 and [p.name for p in result.samples] == [
        "run-s00000004.png", "run-s00000008.png", "run-s00000012.png", "run-e000003.png"
    ]  # fmt: skip
    with Image.open(out / "samples" / "run-e000003.png") as grid:
        assert grid.width > 64 and grid.height > 2 * 64  # two prompts, upscaled tiles
    metas = [load_lora(p).metadata for p in result.saved]
    assert [m["ss_epoch"] for m in metas] == ["1", "2", "3"] and [m["ss_steps"] for m in metas] == [
        "5",
        "10",
        "15",
    ]
    # under restarts, epoch checkpoints land at different LR phases: the LR at each save is recorded
    lrs = [json.loads(m["lorafuse_lr_at_save"])["unet"] for m in metas]
    assert len(set(lrs)) == 3


def _final_tensors(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(result.lora_path))


def test_caches_change_speed_not_results(train_overrides, tmp_path):
    common = {
        "network.network_train_unet_only": True,
        "training.max_train_steps": 3,
        "dataset.flip_aug": True,
    }
    plain = _run(train_overrides(**common, **{"training.output_dir": tmp_path / "a"}))
    cached = _run(
        train_overrides(
            **common,
            **{
                "training.output_dir": tmp_path / "b",
                "dataset.cache_latents": True,
                "dataset.cache_latents_to_disk": True,
                "dataset.cache_dir": tmp_path / "cache",
                "dataset.cache_text_encoder_outputs": True,
            },
        )
    )
    assert list((tmp_path / "cache").glob("*.safetensors"))
    a, b = _final_tensors(plain), _final_tensors(cached)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_up" in k)
    # equal up to float rounding: cached latents are encoded in other batch sizes, which Adam's normalised
    # steps carry into the last digits of the weights
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)


def test_cached_run_samples_like_an_uncached_one(train_overrides, tmp_path):
    # With caches the trainer drops the VAE encoder after caching; samples during training must still decode.
    common = {
        "network.network_train_unet_only": True,
        "training.max_train_epochs": 1,
        "training.sample_every_n_epochs": 1,
        "training.sample_prompts": '["a photo of a sks robot"]',
        "training.sample_steps": 2,
    }
    cache = {"dataset.cache_latents": True, "dataset.cache_text_encoder_outputs": True}
    grids = []
    for name, extra in (("plain", {}), ("cached", cache)):
        result = _run(train_overrides(**common, **extra, **{"training.output_dir": tmp_path / name}))
        with Image.open(result.samples[0]) as grid:
            grids.append(torch.from_numpy(np.asarray(grid.convert("RGB"), dtype=np.float32)))
    assert grids[0].shape == grids[1].shape
    # the LoRAs agree up to float rounding (test above), so the 8-bit grids differ in a few pixels by a level
    assert (grids[0] - grids[1]).abs().mean() < 0.5


def test_gradient_checkpointing_changes_memory_not_results(train_overrides, tmp_path):
    runs = [
        _run(
            train_overrides(
                **{"training.gradient_checkpointing": gc, "training.output_dir": tmp_path / str(gc)}
            )
        )
        for gc in (False, True)
    ]
    a, b = (_final_tensors(r) for r in runs)
    assert any(k.startswith("lora_te_") and "lora_up" in k and v.abs().max() > 0 for k, v in b.items())
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_blora_preset_trains_only_its_block(train_overrides):
    result = _run(
        train_overrides(**{"network.layers": "blora_style", "network.network_train_unet_only": True})
    )
    keys = load_lora(result.lora_path).modules
    assert keys and all(k.startswith("unet.up_blocks.0.attentions.1.") for k in keys)


def test_v_prediction_and_text_encoder_only(train_overrides):
    result = _run(
        train_overrides(
            **{
                "model.pretrained_model_name_or_path": "sd15-tiny",
                "model.v_parameterization": True,
                "network.network_train_text_encoder_only": True,
                "loss.min_snr_gamma": 5,
                "training.max_train_steps": 2,
            }
        )
    )
    state = load_lora(result.lora_path)
    assert state.components() == {"text_encoder"}
    assert state.metadata["ss_v_parameterization"] == "True"
    assert state.metadata["modelspec.prediction_type"] == "v"


# --- bad inputs: clear errors, and nothing written -------------------------------------------------------------


def _assert_nothing_written(tmp_path):
    assert not (tmp_path / "out").exists()


def test_empty_dataset(train_overrides, world_dataset, tmp_path):
    for image in (world_dataset / "3_sks robot").glob("*.png"):
        image.unlink()
    with pytest.raises(UserInputError, match="no usable training images"):
        _run(train_overrides())
    _assert_nothing_written(tmp_path)


def test_malformed_repeats_folder(train_overrides, world_dataset, tmp_path):
    shutil.move(world_dataset / "3_sks robot", world_dataset / "3x_sks robot")
    with pytest.raises(UserInputError, match="folder name must be '<repeats>_<trigger> <class>'"):
        _run(train_overrides())
    _assert_nothing_written(tmp_path)


def test_resolution_not_divisible_by_8(train_overrides, tmp_path):
    with pytest.raises(ConfigError, match="resolution: must be a positive multiple of 8"):
        _run(train_overrides(**{"dataset.resolution": 60}))
    _assert_nothing_written(tmp_path)


def test_base_folder_that_is_not_a_diffusers_folder(train_overrides, tmp_path):
    (tmp_path / "notabase").mkdir()
    (tmp_path / "notabase" / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(UserInputError, match=r"not a diffusers pipeline folder \(no model_index.json"):
        _run(train_overrides(**{"model.pretrained_model_name_or_path": tmp_path / "notabase"}))
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ("model.ckpt", "single-file checkpoints as .safetensors only"),
        ("missing/folder/path", "no such file or folder"),
    ],
)
def test_base_paths_that_cannot_load(train_overrides, tmp_path, base, message):
    if base.endswith(".ckpt"):
        (tmp_path / base).write_bytes(b"\0")
        base = str(tmp_path / base)
    with pytest.raises(UserInputError, match=message):
        _run(train_overrides(**{"model.pretrained_model_name_or_path": base}))
    _assert_nothing_written(tmp_path)


def test_missing_optimizer_package_fails_before_loading(train_overrides, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: import raises ImportError
    with pytest.raises(UserInputError, match=r"AdamW8bit needs .*bitsandbytes.*pip install 'lorafuse\[8bit\]'"):
        _run(train_overrides(**{"optimizer.optimizer_type": "AdamW8bit"}))
    _assert_nothing_written(tmp_path)


def test_wrong_block_dims_length(train_overrides, tmp_path):
    with pytest.raises(UserInputError, match="block_dims has 2 entries, this world UNet has 13 blocks"):
        _run(train_overrides(**{"network.block_dims": "[1, 2]"}))
    _assert_nothing_written(tmp_path)


def test_tensorboard_logging_needs_tensorboard(train_overrides, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here")
    with pytest.raises(UserInputError, match="needs the tensorboard package"):
        _run(train_overrides(**{"training.logging": "tensorboard"}))
    _assert_nothing_written(tmp_path)


def test_step_samples_alone_keep_the_vae_decoder_after_latent_caching(train_overrides):
    result = _run(
        train_overrides(
            **{
                "training.max_train_steps": 2,
                "training.sample_every_n_steps": 2,
                "training.sample_prompts": '["a photo of a sks robot"]',
                "training.sample_steps": 1,
                "dataset.cache_latents": True,
            }
        )
    )
    assert [p.name for p in result.samples] == ["run-s00000002.png"]
