"""LoRA training on the tiny FLUX.1 (flux-tiny): the same TOML and loop as SD. It learns, resumes bit for bit,
targets the modules each layer selection names, writes files diffusers' FluxPipeline loads whole, and refuses
the settings rectified flow does not use."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from lorafuse.errors import UserInputError
from lorafuse.families import get_family
from lorafuse.lora.io import load_lora
from lorafuse.lora.keys import canonical_key
from lorafuse.lora.validate import validate_lora
from lorafuse.models.load import load_base_pipeline
from lorafuse.train.cache import encode_latents
from lorafuse.train.config import load_train_config
from lorafuse.train.data import image_tensor
from lorafuse.train.loop import train_lora
from lorafuse.train.network import plan_network
from lorafuse.train.scan import scan_dataset

FLUX = get_family("flux")


@pytest.fixture
def flux_overrides(train_overrides):
    def make(**extra: object) -> dict[str, str]:
        return train_overrides(**{"model.pretrained_model_name_or_path": "flux-tiny", **extra})

    return make


def _run(overrides: dict[str, str]):
    return train_lora(load_train_config(None, overrides), progress_bar=False)


def _merged(lora_path):
    """A fresh flux-tiny with the file's ΔW added to its weights (the slow, obvious way to apply a LoRA)."""
    pipe = load_base_pipeline("flux-tiny")
    state = load_lora(lora_path, base=pipe)
    report = validate_lora(state, pipe, arch="flux")
    assert not report.unmatched and report.coverage == 1.0
    with torch.no_grad():
        for key, ref in report.targets.items():
            module = getattr(pipe, ref.component).get_submodule(ref.path)
            module.weight += state.modules[key].delta_weight(module.weight.shape)
    return pipe


def _fixed_flow_loss(pipe, dataset) -> float:
    """Velocity MSE ‖v̂ − (ε − x0)‖² on the dataset at fixed σ and noise: comparable before and after training."""
    cfg = load_train_config(None, {"model.pretrained_model_name_or_path": "flux-tiny",
                                   "dataset.train_data_dir": str(dataset)})  # fmt: skip
    items = scan_dataset(cfg.dataset).items
    pixels = torch.stack([image_tensor(item, False, None)[0] for item in items])
    x0 = FLUX.normalize_latents(encode_latents(pipe.vae, pixels), pipe.vae.config)  # (N, 16, 8, 8)
    text = FLUX.training_text([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                              [it.caption for it in items], clip_skip=1, max_token_length=None)  # fmt: skip
    model = FLUX.training_denoiser(pipe.transformer, latent_hw=tuple(x0.shape[-2:]), guidance_scale=1.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        for sigma in (0.2, 0.4, 0.6, 0.8):
            noise = torch.randn(x0.shape, generator=g)
            x_t = (1 - sigma) * x0 + sigma * noise
            pred = model(x_t, torch.full((len(x0),), 1000 * sigma), FLUX.training_cond(text, {}))
            losses.append(torch.nn.functional.mse_loss(pred, noise - x0).item())
    return sum(losses) / len(losses)


def test_a_few_steps_reduce_the_flow_loss(flux_overrides, world_dataset):
    result = _run(flux_overrides(**{
        "network.network_dim": 8, "network.network_alpha": 8, "network.network_train_unet_only": True,
        "dataset.cache_latents": True, "dataset.cache_text_encoder_outputs": True,
        "loss.timestep_sampling": "shift", "loss.discrete_flow_shift": 3.1582,
        "optimizer.learning_rate": 1e-2, "training.train_batch_size": 3, "training.max_train_steps": 16,
    }))  # fmt: skip
    assert result.arch == "flux" and result.global_step == 16
    before = _fixed_flow_loss(load_base_pipeline("flux-tiny"), world_dataset)
    after = _fixed_flow_loss(_merged(result.lora_path), world_dataset)
    assert after < 0.85 * before, (before, after)  # 0.76 here


def test_resume_is_bit_identical(flux_overrides, tmp_path):
    settings = {
        "dataset.flip_aug": True, "network.network_dropout": 0.1, "loss.timestep_sampling": "sigmoid",
        "loss.weighting_scheme": "cosmap", "model.guidance_scale": 3.5,
        "scheduler.lr_scheduler": "cosine", "training.gradient_accumulation_steps": 2,
        "training.max_train_steps": 5, "training.save_every_n_steps": 2, "training.save_state": True,
    }  # fmt: skip
    full = _run(flux_overrides(**settings, **{"training.output_dir": tmp_path / "full"}))
    state = tmp_path / "full" / "run-step00000002-state"
    assert state in full.states
    resumed = _run(flux_overrides(**settings, **{"training.output_dir": tmp_path / "resumed",
                                                 "training.resume": state}))  # fmt: skip
    assert resumed.global_step == 5
    a, b = load_file(str(full.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys() and any(k.startswith("lora_te1_") for k in a)  # CLIP-L trained too
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_up" in k), "nothing trained: proves nothing"
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


@pytest.mark.parametrize(
    "layers, expected",
    [
        ("all", r"^(transformer_blocks|single_transformer_blocks)\.\d+\."),
        ("double", r"^transformer_blocks\.\d+\."),
        ("single", r"^single_transformer_blocks\.\d+\."),
        ('["^transformer_blocks\\\\.1\\\\.", "^single_transformer_blocks\\\\.(0|3)\\\\."]',
         r"^(transformer_blocks\.1|single_transformer_blocks\.(0|3))\."),
    ],
    ids=["all", "double", "single", "by-index"],
)
def test_layer_selection_targets_the_named_blocks(layers, expected, flux_overrides):
    import re

    pipe = load_base_pipeline("flux-tiny")
    cfg = load_train_config(None, flux_overrides(**{"network.layers": layers}))
    plan = plan_network(pipe, cfg.network)
    assert set(plan) == {"transformer", "text_encoder"}  # CLIP-L; T5 (text_encoder_2) never gets a LoRA
    linears = {n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    wanted = {n for n in linears if re.match(expected, n)}
    assert set(plan["transformer"]) == wanted and wanted
    only = load_train_config(None, flux_overrides(**{"network.layers": layers,
                                                     "network.network_train_unet_only": True}))  # fmt: skip
    assert set(plan_network(pipe, only.network)) == {"transformer"}


@contextlib.contextmanager
def _diffusers_warnings():
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


# diffusers 0.42 splits kohya single blocks' fused linear1 at FLUX.1's real widths, which a tiny model does not
# have (tests/lora/test_flux_diffusers_interop.py): the kohya file is checked on the double blocks, the
# diffusers-format file on every block.
@pytest.mark.parametrize("fmt, layers", [("kohya", "double"), ("diffusers", "all")])
def test_trained_file_loads_whole_in_flux_pipeline(fmt, layers, flux_overrides):
    result = _run(flux_overrides(**{"network.layers": layers, "training.lora_format": fmt,
                                    "training.max_train_steps": 2}))  # fmt: skip
    pipe = load_base_pipeline("flux-tiny")
    state = load_lora(result.lora_path, base=pipe)
    meta = state.metadata
    assert meta["modelspec.architecture"].startswith("flux-1") and "modelspec.prediction_type" not in meta
    # the sampling settings, under kohya's flux_train_network names
    assert (meta["ss_timestep_sampling"], meta["ss_discrete_flow_shift"], meta["ss_guidance_scale"]) == (
        "sigma", "3.0", "1.0",
    )  # fmt: skip
    with _diffusers_warnings() as messages:
        pipe.load_lora_weights(str(result.lora_path))
    assert not [m for m in messages if "unexpected keys" in m or "missing keys" in m], messages
    layers_found = {
        canonical_key(c, name)
        for c in ("transformer", "text_encoder")
        for name, sub in getattr(pipe, c).named_modules()
        if isinstance(sub, LoraLayer)
    }
    assert layers_found == set(state.modules)


def test_bf16_and_gradient_checkpointing(flux_overrides):
    plain = _run(flux_overrides(**{"training.max_train_steps": 2, "network.network_train_unet_only": True}))
    ckpt = _run(flux_overrides(**{"training.max_train_steps": 2, "network.network_train_unet_only": True,
                                  "training.gradient_checkpointing": True,
                                  "training.output_dir": plain.lora_path.parent / "ckpt"}))  # fmt: skip
    assert plain.losses == ckpt.losses  # recomputing activations changes memory, not results
    bf16 = _run(flux_overrides(**{"training.max_train_steps": 2, "training.mixed_precision": "bf16",
                                  "training.output_dir": plain.lora_path.parent / "bf16"}))  # fmt: skip
    assert all(torch.isfinite(torch.tensor(bf16.losses)))
    assert bf16.losses[0] == pytest.approx(plain.losses[0], rel=0.05)  # the same draw, in bfloat16


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"loss.min_snr_gamma": 5}, r"loss\.min_snr_gamma does not apply to FLUX\.1"),
        ({"loss.noise_offset": 0.05}, r"loss\.noise_offset does not apply"),
        ({"model.v_parameterization": True}, r"v_parameterization does not apply"),
        ({"loss.loss_type": "huber"}, r"huber_schedule does not apply.*constant or exponential"),
        ({"network.block_dims": "[4, 4]"}, r"block_dims numbers kohya's UNet blocks.*network\.layers"),
        ({"network.network_module": "lycoris.kohya"}, r"lycoris\.kohya' trains UNet bases"),
        ({"dataset.max_token_length": 150}, r"max_token_length = 150.*t5xxl_max_token_length"),
    ],
)
def test_settings_flow_does_not_use_are_refused(setting, message, flux_overrides, tmp_path):
    with pytest.raises(UserInputError, match=message):
        _run(flux_overrides(**setting))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"loss.timestep_sampling": "shift"}, r"loss\.timestep_sampling is for flow-matching bases"),
        ({"dataset.t5xxl_max_token_length": 256}, r"t5xxl_max_token_length is for FLUX\.1's T5; .* has no T5"),
    ],
)
def test_flow_settings_on_an_sd_base_are_refused(setting, message, train_overrides, tmp_path):
    with pytest.raises(UserInputError, match=message):
        _run(train_overrides(**setting))
    assert not (tmp_path / "out").exists()


def test_caches_change_speed_not_results(flux_overrides, tmp_path):
    """Cached FLUX latents (posterior mean, shifted and scaled at use) and cached T5 + pooled CLIP-L outputs give the
    run an uncached one gives: the same losses, the same weights up to float rounding (the cache encodes images in
    other batch sizes, and Adam's normalised steps carry that into the last digits, as on SD)."""
    common = {"training.max_train_steps": 3, "network.network_train_unet_only": True}
    plain = _run(flux_overrides(**common, **{"training.output_dir": tmp_path / "plain"}))
    cached = _run(flux_overrides(**common, **{"training.output_dir": tmp_path / "cached",
                                              "dataset.cache_latents": True,
                                              "dataset.cache_text_encoder_outputs": True}))  # fmt: skip
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(plain.losses), rtol=1e-6, atol=0)
    a, b = load_file(str(plain.lora_path)), load_file(str(cached.lora_path))
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_up" in k)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)


def test_latents_are_shifted_and_scaled_like_diffusers():
    """FLUX's VAE latents enter the transformer as (z - shift_factor) * scaling_factor, as diffusers' FLUX training
    script and FluxPipeline's image-to-image path prepare them; SD's VAEs have no shift."""
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    config = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
    torch.testing.assert_close(FLUX.normalize_latents(z, config), (z - 0.1159) * 0.3611, rtol=0, atol=0)
    sd = get_family("sd15").normalize_latents(z[:, :4], {"scaling_factor": 0.18215, "shift_factor": None})
    torch.testing.assert_close(sd, z[:, :4] * 0.18215, rtol=0, atol=0)


def test_validation_loss_on_held_out_images(flux_overrides):
    """kohya's validation loss on FLUX: fixed noise and t = 1000 σ, the same numbers whenever it is computed."""
    over = {"dataset.validation_split": 0.34, "training.validate_every_n_steps": 1, "training.max_train_steps": 2,
            "optimizer.learning_rate": 1e-9}  # fmt: skip
    result = _run(flux_overrides(**over))
    (s1, v1), (s2, v2) = result.val_losses
    assert (s1, s2) == (1, 2) and torch.isfinite(torch.tensor([v1, v2])).all()
    assert v1 == pytest.approx(v2, rel=1e-4)  # a negligible step: the fixed draws give the same loss
