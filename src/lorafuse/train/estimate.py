"""Peak memory of a training run on its device, estimated before anything loads (`lorafuse train --estimate`).

    weights       frozen denoiser in the compute dtype (mixed_precision), its Linear weights in 1 byte each
                  with quantize_base (plus one scale per output row); text encoders in the compute dtype unless
                  freed after caching; the VAE in float32 (it keeps its dtype) unless freed after caching
    LoRA          factors and their gradients, float32 (4 + 4 bytes per parameter)
    optimizer     AdamW 8 bytes per LoRA parameter; AdamW8bit and PagedAdamW8bit 2 (bitsandbytes keeps tensors
                  under 4096 elements in 32 bits); Lion 4; Lion8bit 1; Prodigy 16; Adafactor a row and a column
                  per matrix
    activations   measured on fake tensors (`train/memory_probe.py`): one step's saved tensors and transients
                  at the batch size and resolution, in the compute dtype, with checkpointing and its offload
    caches        latents and text-encoder outputs in memory (float32); in host memory, on the device only
                  when the device is the CPU
The peak is the larger of two phases: caching (the encoders loaded, the VAE encoding a batch of 4 or the text
encoders 8 captions; on a GPU the denoiser waits on the CPU meanwhile) and training (what stays, plus the step,
in which frozen text encoders run when captions are not cached). Weights come from parameter counts of the base
built on the meta device (`models/meta.py`). Not counted: the CUDA context and kernels (~0.3-1 GB), allocator fragmentation, the
framework's workspaces; the CUDA check keeps `HEADROOM` free for them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorafuse.errors import UserInputError
from lorafuse.train.config import TrainConfig

GB = 1024**3
HEADROOM = 0.08  # of a CUDA device's memory left for the context, kernels and fragmentation
CACHE_BATCH = 4  # `LatentCache`'s encoding batch
TEXT_CACHE_BATCH = 8  # `TextEncoderCache`'s
_DTYPE = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class MemoryEstimate:
    """Bytes on the device by part (training phase), and the caching phase's peak."""

    device: str
    parts: dict[str, int] = field(default_factory=dict)
    caching_peak: int = 0
    host_caches: int = 0  # caches held in host memory when the device is a GPU
    notes: list[str] = field(default_factory=list)

    @property
    def training_peak(self) -> int:
        return sum(self.parts.values())

    @property
    def peak(self) -> int:
        return max(self.training_peak, self.caching_peak)

    def format(self, capacity: int | None = None) -> str:
        lines = [f"estimated peak memory on {self.device}:"]
        lines += [f"  {name:<12} {_gb(n):>10}" for name, n in self.parts.items()]
        lines.append(f"  {'training':<12} {_gb(self.training_peak):>10}")
        lines.append(
            f"  {'caching':<12} {_gb(self.caching_peak):>10}   (encoders loaded, caches being built)"
        )
        fits = (
            ""
            if capacity is None
            else f" of {_gb(capacity)}: {'fits' if self.fits(capacity) else 'DOES NOT FIT'}"
        )
        lines.append(f"  {'peak':<12} {_gb(self.peak):>10}{fits}")
        if self.host_caches:
            lines.append(f"  host memory for caches: {_gb(self.host_caches)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def fits(self, capacity: int) -> bool:
        return self.peak <= capacity * (1 - HEADROOM)


def _gb(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= GB / 10 else f"{n / 2**20:.1f} MB"


def _bytes(module: nn.Module | None, dtype: torch.dtype | None = None) -> int:
    if module is None:
        return 0
    return sum(t.numel() * (dtype or t.dtype).itemsize for t in (*module.parameters(), *module.buffers()))


def _denoiser_bytes(denoiser: nn.Module, dtype: torch.dtype, quantize: str) -> int:
    """Frozen base weights (the LoRA's own factors excluded): 1 byte per quantized Linear weight plus a scale of
    the compute dtype per output row (torchao's per-channel int8 / float8 weight-only)."""
    total = 0
    for name, module in denoiser.named_modules():
        if "lora_" in name:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if quantize != "none" and isinstance(module, nn.Linear) and pname == "weight":
                total += p.numel() + p.shape[0] * dtype.itemsize
            else:
                total += p.numel() * dtype.itemsize
        total += sum(b.numel() * b.dtype.itemsize for b in module.buffers(recurse=False))
    return total


def optimizer_bytes(name: str, params: list[nn.Parameter]) -> int:
    """State bytes of optimizer `name` over these float32 parameters."""
    n = sum(p.numel() for p in params)
    if name == "AdamW":
        return 8 * n
    if name in ("AdamW8bit", "PagedAdamW8bit"):  # 2 uint8 states; 32-bit below bitsandbytes' min_8bit_size (4096)
        return sum(2 * p.numel() if p.numel() >= 4096 else 8 * p.numel() for p in params)
    if name == "Lion":  # one momentum
        return 4 * n
    if name == "Lion8bit":  # one uint8 momentum; 32-bit below min_8bit_size
        return sum(p.numel() if p.numel() >= 4096 else 4 * p.numel() for p in params)
    if name == "Prodigy":  # exp_avg, exp_avg_sq, s, p0
        return 16 * n
    if name == "Adafactor":  # factored second moment of matrices, no first moment (beta1 None)
        return sum(
            4 * (p.shape[0] + p.numel() // p.shape[0]) if p.dim() > 1 else 4 * p.numel() for p in params
        )
    raise UserInputError(f"no memory model for optimizer_type {name!r}")


def _cache_bytes(cfg: TrainConfig, latent: tuple[int, int, int], text: tuple[int, int], samples: int) -> int:
    """In-memory latent and text-encoder caches (float32) for `samples` images (x2 latents with flip_aug)."""
    ds, total = cfg.dataset, 0
    if ds.cache_latents and not ds.cache_latents_to_disk:
        total += samples * (2 if ds.flip_aug else 1) * math.prod(latent) * 4
    if ds.cache_text_encoder_outputs and not ds.cache_text_encoder_outputs_to_disk:
        total += samples * math.prod(text) * 4
    return total


def estimate_memory(
    cfg: TrainConfig,
    *,
    device: str = "cuda",
    components: dict[str, nn.Module] | None = None,
    samples: int | None = None,
) -> MemoryEstimate:
    """The run's peak memory on `device` ("cuda", "cpu"), from its base built on the meta device (`components`:
    already built ones, e.g. by a caller trying several settings; they get a LoRA injected here once)."""
    from lorafuse.families import family_of
    from lorafuse.models.meta import meta_components

    comps = components if components is not None else meta_components(cfg.model.pretrained_model_name_or_path)
    family = family_of(comps)
    notes = []
    if samples is None:
        samples, notes = _samples(cfg)
    est = _estimate(cfg, device, comps, family, _lora(comps, cfg, family), samples)
    est.notes += notes
    return est


def _samples(cfg: TrainConfig) -> tuple[int, list[str]]:
    """Images in the dataset (for the in-memory caches); 0 with a note when it cannot be read (planning ahead)."""
    from lorafuse.train.scan import scan_dataset

    try:
        return len(scan_dataset(cfg.dataset).items), []
    except UserInputError as e:
        return 0, [f"in-memory caches not counted: the dataset cannot be read ({e})"]


def _lora(comps: dict[str, nn.Module], cfg: TrainConfig, family: Any) -> Any:
    from lorafuse.train.network import create_network

    with torch.random.fork_rng(devices=[]):  # the LoRA's init draws; the caller's stream stays as it was
        return create_network(comps, cfg.network, family.name)


def _swapped_bytes(cfg: TrainConfig, family: Any, denoiser: nn.Module) -> int:
    """Weight bytes blocks_to_swap keeps off the device: the swapped blocks' less the largest one, which visits."""
    n = cfg.training.blocks_to_swap
    if not n:
        return 0
    from lorafuse.train.block_swap import swapped_blocks

    kinds = family.swap_blocks(denoiser)
    if kinds is None:
        raise UserInputError(
            f"training.blocks_to_swap is for FLUX.1's transformer blocks; {family.label} has none"
        )
    sizes = [_denoiser_bytes(b, _DTYPE[cfg.training.mixed_precision], cfg.model.quantize_base)
             for b in swapped_blocks(*kinds, n)]  # fmt: skip
    return sum(sizes) - max(sizes)


def _step_shape(cfg: TrainConfig, denoiser: nn.Module, vae: nn.Module):
    """(the probed step's `StepShape`, latent (C, h, w), text conditioning (tokens, width)) of a run."""
    from lorafuse.train.memory_probe import StepShape

    ds, tc = cfg.dataset, cfg.training
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    w, h = ds.size
    latent = (vae.config.latent_channels, h // factor, w // factor)
    conf = denoiser.config
    width = conf.get("joint_attention_dim") or conf.get("cross_attention_dim")
    t5 = conf.get("joint_attention_dim") is not None  # FLUX.1's T5 sequence; CLIP's 77 per 75-token window
    tokens = (ds.t5xxl_max_token_length or 512) if t5 else 77 * ((ds.max_token_length or 75) // 75)
    shape = StepShape(
        batch=tc.train_batch_size, latent_hw=latent[1:], latent_channels=latent[0], text_tokens=tokens,
        compute_dtype=_DTYPE[tc.mixed_precision], checkpointing=tc.gradient_checkpointing,
        offload_checkpoints=tc.cpu_offload_checkpointing, guidance_scale=cfg.model.guidance_scale,
    )  # fmt: skip
    return shape, latent, (tokens, width)


class _Probes:
    """Probe results by their inputs: a caller trying several settings on one base probes each step once."""

    def __init__(self) -> None:
        self.memo: dict = {}

    def step(self, family, denoiser, encoders, params, shape, frozen=()) -> int:
        from lorafuse.train.memory_probe import probe_step

        key = ("step", shape, len(frozen))
        if key not in self.memo:
            self.memo[key] = probe_step(family, denoiser, encoders, params, shape, frozen)
        return self.memo[key]

    def text(self, encoders: list[nn.Module], batch: int, tokens: int, dtype: torch.dtype) -> int:
        from lorafuse.train.memory_probe import probe_text_encode

        key = ("text", tuple(id(e) for e in encoders), batch, tokens, dtype)
        if key not in self.memo:
            self.memo[key] = probe_text_encode(encoders, batch, tokens, dtype)
        return self.memo[key]

    def vae(self, vae: nn.Module, batch: int, hw: tuple[int, int]) -> int:
        from lorafuse.train.memory_probe import probe_vae_encode

        if ("vae", batch, hw) not in self.memo:
            self.memo["vae", batch, hw] = probe_vae_encode(vae, batch, hw)
        return self.memo["vae", batch, hw]


def _estimate(
    cfg: TrainConfig, device: str, comps: dict, family: Any, network: Any, samples: int, probes: _Probes | None = None
) -> MemoryEstimate:  # fmt: skip
    """The estimate of a base built on the meta device, its LoRA injected."""
    from lorafuse.train.run_setup import denoiser_joins_after_caching

    probes = probes or _Probes()
    ds, tc = cfg.dataset, cfg.training
    shape, latent, text = _step_shape(cfg, comps[family.denoiser_component], comps["vae"])
    dtype, on_cpu = shape.compute_dtype, device.startswith("cpu")
    denoiser, vae = comps[family.denoiser_component], comps["vae"]
    encoders = [comps[c] for c in ("text_encoder", "text_encoder_2", "text_encoder_3") if c in comps]
    named = network.named_parameters()
    params = list(named.values())
    te_lora = sum(p.numel() for c, p in named.items() if c.startswith("text_encoder"))
    te_trained = [comps[c] for c in network.plan if c.startswith("text_encoder")]
    sampling = bool(tc.sample_every_n_epochs or tc.sample_every_n_steps)
    te_bytes = sum(_bytes(te, dtype) for te in encoders)
    free_te = ds.cache_text_encoder_outputs and not te_trained and not sampling
    vae_kept = (_bytes(vae.decoder) + _bytes(getattr(vae, "post_quant_conv", None))) if sampling else 0
    frozen_te = (
        []
        if ds.cache_text_encoder_outputs
        else [te for te in encoders if all(te is not t for t in te_trained)]
    )
    step = probes.step(family, denoiser, te_trained, params, shape, frozen_te)
    # without cached latents the VAE encodes each batch before the denoiser runs: the larger transient counts
    if not ds.cache_latents:
        step = max(step, probes.vae(vae, tc.train_batch_size, ds.size[::-1]))
    caches = _cache_bytes(cfg, latent, text, samples)
    den_bytes = _denoiser_bytes(denoiser, dtype, cfg.model.quantize_base) - _swapped_bytes(
        cfg, family, denoiser
    )
    est = MemoryEstimate(device=device, host_caches=0 if on_cpu else caches)
    est.parts = {
        "weights": den_bytes + (0 if free_te else te_bytes) + (vae_kept if ds.cache_latents else _bytes(vae)),
        "LoRA": 8 * sum(p.numel() for p in params),  # float32 factors and their gradients
        "optimizer": optimizer_bytes(cfg.optimizer.optimizer_type, params),
        "activations": step,
        "caches": caches if on_cpu else 0,
    }
    # on a GPU the denoiser and its LoRA wait on the CPU while caches are built (`denoiser_joins_after_caching`)
    load = te_bytes + _bytes(vae) + 4 * te_lora
    if on_cpu or not denoiser_joins_after_caching(cfg):
        load += den_bytes + 4 * (sum(p.numel() for p in params) - te_lora)
    cache_pass = max(
        probes.vae(vae, CACHE_BATCH, ds.size[::-1]) if ds.cache_latents else 0,
        probes.text(encoders, TEXT_CACHE_BATCH, text[0], dtype) if ds.cache_text_encoder_outputs else 0,
    )
    est.caching_peak = load + cache_pass + (caches if on_cpu else 0)
    if te_trained:
        est.notes.append("text-encoder LoRA: its activations are counted at 77 tokens per caption")
    return est


# --- will it fit? ---------------------------------------------------------------------------------------------

_OPTIONS: list[tuple[str, dict[str, dict[str, Any]]]] = [
    ("training.gradient_checkpointing = true", {"training": {"gradient_checkpointing": True}}),
    ("training.mixed_precision = 'bf16'", {"training": {"mixed_precision": "bf16"}}),
    ("dataset.cache_latents = true", {"dataset": {"cache_latents": True}}),
    ("model.quantize_base = 'int8'", {"model": {"quantize_base": "int8"}}),
    ("optimizer.optimizer_type = 'AdamW8bit'", {"optimizer": {"optimizer_type": "AdamW8bit"}}),
    ("training.cpu_offload_checkpointing = true (with gradient_checkpointing)", {"training": {"gradient_checkpointing": True,
                                                                 "cpu_offload_checkpointing": True}}),
    ("training.blocks_to_swap = 18 (FLUX.1, with gradient_checkpointing)",
     {"training": {"gradient_checkpointing": True, "blocks_to_swap": 18}}),
    ("training.train_batch_size = 1", {"training": {"train_batch_size": 1}}),
    ("no sample_every_n_epochs / _steps (frees the text encoders and the VAE after caching)",
     {"training": {"sample_every_n_epochs": None, "sample_every_n_steps": None}}),
]  # fmt: skip


def _with(cfg: TrainConfig, changes: dict[str, dict[str, Any]]) -> TrainConfig | None:
    """cfg with the changes, or None if it already has them or they are not allowed together."""
    tables = {}
    for table, fields in changes.items():
        current = getattr(cfg, table)
        if all(getattr(current, k) == v for k, v in fields.items()):
            return None
        tables[table] = dataclasses.replace(current, **fields)
    try:
        return dataclasses.replace(cfg, **tables)
    except UserInputError:
        return None


def options_that_fit(cfg: TrainConfig, capacity: int, estimate) -> list[tuple[str, int]]:
    """Settings that bring the peak under `capacity`: each single change that suffices, else the changes of
    `_OPTIONS` taken in order until it fits. [(what to set, its peak)]; empty when nothing listed fits.
    `estimate(cfg) -> MemoryEstimate` (the caller's, so that the base is built once)."""

    def estimate_or_none(c: TrainConfig) -> MemoryEstimate | None:
        try:
            return estimate(c)
        except UserInputError:  # an option this base cannot take (blocks_to_swap without swappable blocks)
            return None

    single = []
    for text, change in _OPTIONS:
        changed = _with(cfg, change)
        if changed is not None and (est := estimate_or_none(changed)) is not None and est.fits(capacity):
            single.append((text, est.peak))
    if single:
        return single
    steps, current = [], cfg
    for text, change in _OPTIONS:
        changed = _with(current, change)
        if changed is None or (est := estimate_or_none(changed)) is None:
            continue
        current = changed
        steps.append((text, change))
        if est.fits(capacity):
            return [_pruned(cfg, steps, capacity, estimate_or_none)]
    return []


def _pruned(cfg: TrainConfig, steps: list, capacity: int, estimate) -> tuple[str, int]:
    """The changes taken in order, less each one the others fit without (last first): a short list to set."""
    kept = list(steps)
    for step in reversed(steps):
        trial = [s for s in kept if s is not step]
        changed: TrainConfig | None = cfg
        for _, change in trial:
            changed = _with(changed, change) or changed
        if trial and (est := estimate(changed)) is not None and est.fits(capacity):
            kept = trial
    final = cfg
    for _, change in kept:
        final = _with(final, change) or final
    return " and ".join(text for text, _ in kept), estimate(final).peak


def check_fits(
    cfg: TrainConfig, capacity: int, device: str = "cuda", components: dict[str, nn.Module] | None = None,
    samples: int | None = None,
) -> MemoryEstimate:  # fmt: skip
    """Raise `UserInputError` if the run's estimated peak exceeds `capacity` bytes (less `HEADROOM`), naming the
    settings that would make it fit. Runs before any weight loads."""
    from lorafuse.families import family_of
    from lorafuse.models.meta import meta_components

    comps = components if components is not None else meta_components(cfg.model.pretrained_model_name_or_path)
    family, notes = family_of(comps), []
    if samples is None:
        samples, notes = _samples(cfg)
    network, probes = _lora(comps, cfg, family), _Probes()

    def estimate(c: TrainConfig) -> MemoryEstimate:
        return _estimate(c, device, comps, family, network, samples, probes)

    est = estimate(cfg)
    est.notes += notes
    if est.fits(capacity):
        return est
    found = options_that_fit(cfg, capacity, estimate)
    advice = (
        "; ".join(f"{what} (estimated {_gb(peak)})" for what, peak in found)
        if found
        else "none of the memory options listed in the README does; use a smaller resolution or a larger GPU"
    )
    raise UserInputError(
        f"{cfg.model.pretrained_model_name_or_path}: this run needs an estimated {_gb(est.peak)} on {device}, "
        f"which has {_gb(capacity)} ({int(HEADROOM * 100)} % kept free). It would fit with: {advice}. "
        "(training.memory_check = false trains anyway.)\n" + est.format(capacity)
    )


def check_device_memory(
    cfg: TrainConfig, device: torch.device, samples: int, capacity: int | None = None
) -> None:
    """`check_fits` against a CUDA device's memory (or `capacity` bytes); a base whose architecture cannot be
    read without loading it is not checked (a warning says so)."""
    import logging

    from lorafuse.models.meta import meta_components

    try:
        comps = meta_components(cfg.model.pretrained_model_name_or_path)
    except UserInputError as e:
        logging.getLogger(__name__).warning("memory check skipped: %s", e)
        return
    if capacity is None:
        capacity = torch.cuda.get_device_properties(device).total_memory
    check_fits(cfg, capacity, device=str(device), components=comps, samples=samples)
