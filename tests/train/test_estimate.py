"""`lorafuse train --estimate`: the peak-memory estimate against the peak measured in real training steps on the
CPU, the fit decision against a fake device capacity, and the base built without reading its weights.

What is compared: the estimate's peak (weights + LoRA + optimizer state + one step's activations + caches, or
the caching phase if larger) with the peak of live tensor bytes that torch's CPU allocator reports to the
profiler (`profile_memory=True`) over a whole `train_lora` run: every allocation and free from the first weight
to the last step, summed in time order. This counts exactly the tensors the estimate models, and none of the
interpreter, the libraries or the allocator's free pages that make RSS deltas noisy at these sizes (tens of MB).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lorafuse.cli.main import main
from lorafuse.errors import UserInputError
from lorafuse.train.config import load_train_config
from lorafuse.train.estimate import GB, MemoryEstimate, check_fits, estimate_memory, options_that_fit
from lorafuse.train.loop import train_lora


def measured_peak(cfg) -> int:
    """Peak live CPU tensor bytes of a real training run, from the allocator events the profiler records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_lora(cfg, progress_bar=False)
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    current = peak = 0
    for e in events:
        current += e.nbytes()  # negative for a free
        peak = max(peak, current)
    return peak


CASES = {
    # base, resolution, batch, extra settings
    "world, UNet + text-encoder LoRA": ("world-random", 64, 2, {}),
    "world, checkpointing, 128 px": ("world-random", 128, 4, {"training.gradient_checkpointing": "true"}),
    "sd15-tiny, cached latents": (
        "sd15-tiny", 64, 2, {"dataset.cache_latents": "true", "network.network_train_unet_only": "true"},
    ),
    "sdxl-tiny": ("sdxl-tiny", 64, 2, {}),
    "flux-tiny, checkpointing, 2 blocks swapped": (
        "flux-tiny", 64, 2, {"training.gradient_checkpointing": "true", "training.blocks_to_swap": "2"},
    ),
    "world, bf16, 128 px": ("world-random", 128, 4, {"training.mixed_precision": "bf16"}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_is_within_15_percent_of_the_measured_peak(case, train_overrides):
    base, size, batch, extra = CASES[case]
    overrides = train_overrides(**{
        "model.pretrained_model_name_or_path": base, "dataset.resolution": size,
        "training.train_batch_size": batch, "training.max_train_steps": 3, "training.logging": "none", **extra,
    })  # fmt: skip
    cfg = load_train_config(None, {k: str(v) for k, v in overrides.items()})
    estimate = estimate_memory(cfg, device="cpu")
    assert estimate.parts["activations"] > 0 and estimate.parts["weights"] > 0
    measured = measured_peak(cfg)
    assert abs(estimate.peak / measured - 1) <= 0.15, (case, estimate.format(), measured / 2**20)


def test_checkpointing_and_batch_size_move_the_estimate_the_right_way(train_overrides):
    cfg = load_train_config(
        None, train_overrides(**{"dataset.resolution": 128, "training.train_batch_size": 4})
    )
    plain = estimate_memory(cfg, device="cpu").parts["activations"]
    ckpt = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, gradient_checkpointing=True))
    one = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, train_batch_size=1))
    assert estimate_memory(ckpt, device="cpu").parts["activations"] < 0.7 * plain
    assert estimate_memory(one, device="cpu").parts["activations"] < 0.5 * plain
    # cached latents, so the step (not the VAE pass) is the transient: offloading its checkpoints shrinks it
    cached = dataclasses.replace(ckpt, dataset=dataclasses.replace(ckpt.dataset, cache_latents=True))
    offloaded = dataclasses.replace(
        cached, training=dataclasses.replace(cached.training, cpu_offload_checkpointing=True)
    )
    on_gpu = estimate_memory(cached, device="cuda").parts["activations"]
    assert estimate_memory(offloaded, device="cuda").parts["activations"] < 0.6 * on_gpu


def _fake_estimate(cfg) -> MemoryEstimate:
    """A stand-in estimator: 20 GB, less 6 with checkpointing, 4 with bf16, 3 with 8-bit AdamW; a base without
    swappable blocks, as the real estimate says of a UNet."""
    if cfg.training.blocks_to_swap:
        raise UserInputError("training.blocks_to_swap is for FLUX.1's transformer blocks")
    gb = 20 - 6 * cfg.training.gradient_checkpointing - 4 * (cfg.training.mixed_precision == "bf16")
    gb -= 3 * (cfg.optimizer.optimizer_type == "AdamW8bit")
    return MemoryEstimate(device="cuda", parts={"weights": gb * GB})


def test_options_that_fit_names_single_changes_first_then_a_combination(train_overrides):
    cfg = load_train_config(None, train_overrides())
    single = options_that_fit(cfg, 16 * GB, _fake_estimate)  # 16 GB less 8 % headroom: 14.7 GB
    assert [what for what, _ in single] == [
        "training.gradient_checkpointing = true",
        "training.cpu_offload_checkpointing = true (with gradient_checkpointing)",
    ]  # not blocks_to_swap: this base has no swappable blocks, so the option is left out
    combined = options_that_fit(cfg, 12 * GB, _fake_estimate)  # needs checkpointing and bf16 (10 GB)
    assert combined == [
        ("training.gradient_checkpointing = true and training.mixed_precision = 'bf16'", 10 * GB)
    ]
    # 9.2 GB usable: taken in order, checkpointing, bf16, cached latents, int8 and 8-bit AdamW fit (7 GB); cached
    # latents and int8 change nothing here, so the answer leaves them out
    pruned = options_that_fit(cfg, 10 * GB, _fake_estimate)
    assert pruned == [("training.gradient_checkpointing = true and training.mixed_precision = 'bf16' and "
                       "optimizer.optimizer_type = 'AdamW8bit'", 7 * GB)]  # fmt: skip
    assert options_that_fit(cfg, 7 * GB, _fake_estimate) == []  # 7 GB after every option: > 6.44 GB


def test_a_run_that_does_not_fit_fails_with_the_options_that_would(train_overrides):
    cfg = load_train_config(
        None, train_overrides(**{"dataset.resolution": 128, "training.train_batch_size": 4})
    )
    with pytest.raises(UserInputError, match="would fit with: .*train_batch_size = 1") as e:
        check_fits(cfg, 50 * 2**20)
    assert "DOES NOT FIT" in str(e.value)
    est = check_fits(cfg, 1 * GB)  # fits: returns the estimate
    assert est.fits(1 * GB) and est.peak < 0.2 * GB


def test_meta_components_of_a_folder_read_no_weights(tmp_path):
    from lorafuse.models.load import tiny_base
    from lorafuse.models.meta import meta_components

    pipe = tiny_base("sd15-tiny")
    pipe.save_pretrained(tmp_path / "base")
    for weights in (tmp_path / "base").rglob("*.safetensors"):
        weights.unlink()  # only the configs are left
    comps = meta_components(str(tmp_path / "base"))
    for name in ("unet", "vae", "text_encoder"):
        real = sum(p.numel() for p in getattr(pipe, name).parameters())
        assert sum(p.numel() for p in comps[name].parameters()) == real, name
        assert next(comps[name].parameters()).device.type == "meta"


def test_cli_estimate_prints_the_breakdown_and_refuses_a_small_device(train_overrides, capsys):
    words = [w for k, v in train_overrides().items() for w in ("--set", f"{k}={v}")]
    assert main(["train", *words, "--estimate"]) == 0
    out = capsys.readouterr().out
    for part in ("weights", "LoRA", "optimizer", "activations", "caches", "peak"):
        assert part in out
    assert main(["train", *words, "--estimate", "--device-memory", "0.01"]) == 1
    assert "would fit with" in capsys.readouterr().out


@pytest.mark.cuda
def test_on_a_gpu_the_check_runs_before_the_base_loads(train_overrides, monkeypatch):
    import lorafuse.train.prepare as prepare

    monkeypatch.setattr(prepare, "load_base_pipeline", lambda *a, **k: pytest.fail("the base was loaded"))
    cfg = load_train_config(
        None, train_overrides(**{"dataset.resolution": 4096, "training.train_batch_size": 64})
    )
    assert torch.cuda.is_available()
    with pytest.raises(UserInputError, match="would fit with|none of the memory options"):
        train_lora(cfg, progress_bar=False)
