"""The activation memory of one training step, measured on fake tensors: no weights, no compute.

A fake tensor (torch's `FakeTensorMode`) has a shape, a dtype and a device but no data; every op runs its shape
rule only. The step is the real one: the LoRA injected by `create_network`, the family's training call, autocast
in the run's mixed precision, diffusers' gradient checkpointing, the backward pass. `LiveBytes` follows every
storage an op creates until it is freed, so its peak is the step's high-water mark above the weights: the
tensors autograd saves for the backward pass plus the largest transient. This is why the estimate needs no
per-architecture formula: what a frozen Linear saves (nothing, its weight suffices for the input gradient), what
attention saves (the fake tensors claim the CPU, whose SDPA is the flash kernel: out and logsumexp, no L x L
scores, as flash / memory-efficient attention on a GPU) and what checkpointing drops all come from torch itself.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lorafuse.train.offload import Offload, enable_checkpointing, enable_text_encoder_checkpointing


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode and still alive: `current`, and its `peak`.
    Storages that existed before (weights, or anything in `known`) are not counted, nor are their views."""

    def __init__(self, known: set[int] | None = None):
        super().__init__()
        self.current = self.peak = 0
        self._live: set[int] = set(known or ())

    def _freed(self, key: int, nbytes: int) -> None:
        self.current -= nbytes
        self._live.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if (
                not isinstance(t, torch.Tensor) or t.device.type == "meta"
            ):  # meta: offloaded, not on the device
                continue
            storage = t.untyped_storage()
            key = storage._cdata  # the StorageImpl: views and re-wrapped storages share it
            if key in self._live:
                continue
            self._live.add(key)
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out


def storage_keys(*modules: nn.Module) -> set[int]:
    return {t.untyped_storage()._cdata for m in modules for t in (*m.parameters(), *m.buffers())}


@dataclass(frozen=True)
class StepShape:
    """What one training step feeds the denoiser: batch, latent size, text lengths, precision and options."""

    batch: int
    latent_hw: tuple[int, int]
    latent_channels: int
    text_tokens: int  # conditioning sequence length (CLIP 77 per 75-token window; T5 tokens for FLUX.1)
    compute_dtype: torch.dtype
    checkpointing: bool
    offload_checkpoints: bool = False  # the saved tensors go to host memory (`cpu_offload_checkpointing`)
    guidance_scale: float = 1.0


@contextlib.contextmanager
def _offloaded() -> Iterator[None]:
    """Saved tensors leave the device: packed onto the meta device (freeing the fake storage), unpacked as fresh
    fake tensors; the device's count then sees what `save_on_cpu` leaves there."""

    def pack(t: torch.Tensor) -> tuple[torch.Tensor, torch.device]:
        return t.to("meta"), t.device

    def unpack(packed: tuple[torch.Tensor, torch.device]) -> torch.Tensor:
        meta, device = packed
        return torch.empty_like(meta, device=device)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


@contextlib.contextmanager
def _faked(modules: list[nn.Module], params: list[nn.Parameter] = ()) -> Iterator[None]:
    """The modules' meta tensors swapped for fake CPU ones (`to_empty` inside a `FakeTensorMode`), and back
    afterwards, so the same meta modules serve several probes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    saved = [
        (m, kind, name, t)
        for root in modules
        for m in root.modules()
        for kind in ("_parameters", "_buffers")
        for name, t in getattr(m, kind).items()
    ]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            for m in modules:
                m.to_empty(device="cpu")
            for p in params:
                p.grad = torch.zeros_like(p)
            yield
    finally:
        for m, kind, name, t in saved:
            getattr(m, kind)[name] = t
        for p in params:
            p.grad = None


def _cast_frozen(module: nn.Module, dtype: torch.dtype) -> None:
    """The frozen floating weights and buffers in the compute dtype, as `prepare` casts the base (the LoRA's
    factors stay float32)."""
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None and not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in m._buffers.items():
            if b is not None and b.is_floating_point():
                m._buffers[name] = b.to(dtype)


def _conditioning(family: Any, config: Mapping[str, Any], shape: StepShape) -> tuple[dict, dict]:
    """Zero text tensors of the sizes the denoiser's config implies, and the batch fields the family reads."""
    b, dtype = shape.batch, shape.compute_dtype
    width = config.get("joint_attention_dim") or config.get("cross_attention_dim")
    text = {"encoder_hidden_states": torch.zeros(b, shape.text_tokens, width, dtype=dtype)}
    pooled = config.get("pooled_projection_dim")
    if config.get("addition_embed_type") == "text_time":  # SDXL-style: pooled text + 6 size ids per image
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    if pooled:
        text["pooled_prompt_embeds"] = torch.zeros(b, pooled, dtype=dtype)
    h, w = (side * 8 for side in shape.latent_hw)
    batch = {"original_size": [(h, w)] * b, "crop_top_left": [(0, 0)] * b, "target_size": [(h, w)] * b}
    return text, batch


def _autocast(shape: StepShape):
    if shape.compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=shape.compute_dtype)


def probe_step(
    family: Any,
    denoiser: nn.Module,
    text_encoders: list[nn.Module],
    params: list[nn.Parameter],
    shape: StepShape,
    frozen_encoders: list[nn.Module] = (),
) -> int:
    """Peak bytes above the weights of one forward + backward of `denoiser` (its LoRA injected, on the meta
    device) as the loop runs it. `text_encoders`: the ones a LoRA trains; their saved tensors stay alive through
    the denoiser's pass, so their forward runs first, on the prompt's ids; then `frozen_encoders` (captions not
    cached: they run every step, without gradient, T5 at `shape.text_tokens`). `params`: the LoRA's, whose
    gradients are allocated before the step (the estimate counts them with the LoRA)."""
    modules = [denoiser, *text_encoders, *frozen_encoders]
    with _faked(modules, params):
        for m in modules:
            m.train(all(m is not f for f in frozen_encoders))  # as the loop: only modules with a LoRA train
            _cast_frozen(m, shape.compute_dtype)
        if shape.checkpointing and hasattr(denoiser, "enable_gradient_checkpointing"):
            # offloaded: the held block inputs go to meta, which LiveBytes does not count, as host memory
            offload = Offload(torch.device("cpu"), lambda t: t.to("meta"), lambda t: t.to("cpu"))
            enable_checkpointing(denoiser, offload if shape.offload_checkpoints else None)
        te_checkpointing = shape.checkpointing and bool(text_encoders)  # as `prepare`: all of them, or none
        for te in [*text_encoders, *frozen_encoders] if te_checkpointing else ():
            enable_text_encoder_checkpointing(te)
        b, (h, w) = shape.batch, shape.latent_hw
        x = torch.zeros(b, shape.latent_channels, h, w)
        text, batch = _conditioning(family, denoiser.config, shape)
        live = LiveBytes(storage_keys(*modules))
        with live, _offloaded() if shape.offload_checkpoints else contextlib.nullcontext():
            with _autocast(shape):
                te_out = [te(torch.zeros(b, 77, dtype=torch.long))[0] for te in text_encoders]
                with torch.set_grad_enabled(
                    bool(text_encoders)
                ):  # as the loop: on when a text encoder trains
                    frozen_out = [
                        te(torch.zeros(b, _tokens(te, shape), dtype=torch.long))[0] for te in frozen_encoders
                    ]
                cond = family.training_cond(text, batch)
                model = family.training_denoiser(
                    denoiser, latent_hw=(h, w), guidance_scale=shape.guidance_scale
                )
                pred = model(x.to(shape.compute_dtype), torch.full((b,), 500.0), cond)
            loss = pred.float().pow(2).mean() + sum(o.float().mean() for o in te_out) * 0
            loss.backward()
            del pred, loss, te_out, frozen_out
        if shape.checkpointing and hasattr(denoiser, "disable_gradient_checkpointing"):
            denoiser.disable_gradient_checkpointing()
        for te in [*text_encoders, *frozen_encoders] if te_checkpointing else ():
            enable_text_encoder_checkpointing(te, enable=False)
    return live.peak


def _tokens(encoder: nn.Module, shape: StepShape) -> int:
    return shape.text_tokens if getattr(encoder.config, "model_type", "") == "t5" else 77  # T5's or CLIP's


def probe_text_encode(encoders: list[nn.Module], batch: int, t5_tokens: int, dtype: torch.dtype) -> int:
    """Peak bytes above the weights of the frozen text encoders encoding a batch (no gradient), one after the
    other with the earlier outputs held: CLIP at 77 tokens, T5 at `t5_tokens` (its L x L position bias and scores
    make it the largest transient of a FLUX.1 step whose captions are not cached)."""
    if not encoders:
        return 0
    with _faked(encoders):
        for m in encoders:
            _cast_frozen(m, dtype)
        live = LiveBytes(storage_keys(*encoders))
        shape = StepShape(batch, (1, 1), 1, t5_tokens, dtype, checkpointing=False)
        with live, torch.no_grad(), _autocast(shape):
            outs = [te(torch.zeros(batch, _tokens(te, shape), dtype=torch.long))[0] for te in encoders]
            del outs
    return live.peak


def probe_vae_encode(vae: nn.Module, batch: int, pixels_hw: tuple[int, int]) -> int:
    """Peak bytes above the weights of encoding `batch` images with the VAE (no gradient), in its dtype."""
    encoder = [m for m in (getattr(vae, "encoder", None), getattr(vae, "quant_conv", None)) if m is not None]
    dtype = next(vae.parameters()).dtype
    with _faked(encoder):
        live = LiveBytes(storage_keys(*encoder))
        with live, torch.no_grad():
            moments = vae.encoder(torch.zeros(batch, 3, *pixels_hw, dtype=dtype))
            if getattr(vae, "quant_conv", None) is not None:
                moments = vae.quant_conv(moments)
            del moments
    return live.peak
