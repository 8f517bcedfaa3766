"""ZipLoRA's learning step (docs/algorithms.md §5): references, the objective, Adam on the mergers, the mergers file.

The objective, per reference (x, p) and LoRA role, with the same noise and timestep for both forwards:

    L = ‖ε_m(x_c, p_c) − ε_c(x_c, p_c)‖² + ‖ε_m(x_s, p_s) − ε_s(x_s, p_s)‖² + λ Σ_l |cos(m_c,l, m_s,l)|

Implementation: forward hooks on every LoRA'd layer add w · s · B A (m ⊙ x) (the low-rank path, never a dense
ΔW); one set of hooks serves the reference models (ε_c: content alone, ε_s: style alone, no mergers) and the
merged model ε_m, switched by a mode, so all three share the base computation. Only the mergers get gradients.
Notation: see `lorafuse.fusion.ziplora`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from lorafuse.errors import LoraFormatError, UserInputError
from lorafuse.families import family_of
from lorafuse.families.conditioning import Conditioning
from lorafuse.fusion.common import DENOISERS, layer_factors, resolve
from lorafuse.fusion.prompts import encode_prompts
from lorafuse.lora.state import LoraState
from lorafuse.lora.targets import components_of
from lorafuse.train.cache import encode_latents
from lorafuse.train.objectives import uniform_objective
from lorafuse.utils.atomic import atomic_save_safetensors

NAME = "ziplora"
MERGERS_METADATA_KEY = "lorafuse.ziplora"


@dataclass(frozen=True)
class ZipReference:
    """One reference: latents (1, C, h, w), already multiplied by the VAE scaling factor, and its prompt."""

    latents: Tensor
    prompt: str


def encode_reference(pipe: Any, image: Any, prompt: str) -> ZipReference:
    """A reference from an image (path, PIL image, (H, W, 3) array: uint8, or floats in [0, 1]) encoded with the
    pipe's VAE (posterior mean), or from latents (1, C, h, w) / (C, h, w) given as a tensor."""
    if not isinstance(prompt, str):
        raise UserInputError(f"{NAME}: a reference prompt must be a string, got {prompt!r}")
    if isinstance(image, Tensor):
        latents = image[None] if image.dim() == 3 else image
        channels = family_of(pipe).latent_channels(pipe)
        if latents.dim() != 4 or latents.shape[:2] != (1, channels):
            raise UserInputError(
                f"{NAME}: reference latents must have shape (1, {channels}, h, w), got {tuple(image.shape)}"
            )
        return ZipReference(latents.detach().float(), prompt)
    if isinstance(image, (str, Path)):
        import PIL.Image

        if not Path(image).is_file():
            raise UserInputError(f"{NAME}: reference image {image} does not exist")
        image = PIL.Image.open(image).convert("RGB")
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise UserInputError(f"{NAME}: a reference image must be RGB (H, W, 3), got shape {pixels.shape}")
    factor = pipe.vae_scale_factor
    if pixels.shape[0] % factor or pixels.shape[1] % factor:
        raise UserInputError(
            f"{NAME}: reference image size {pixels.shape[1]}x{pixels.shape[0]} is not a multiple of {factor} "
            "(the VAE's downsampling factor); crop or resize it"
        )
    x = torch.from_numpy(pixels.astype(np.float32) / (255.0 if pixels.dtype == np.uint8 else 1.0))
    x = x.permute(2, 0, 1)[None] * 2 - 1  # (1, 3, H, W) in [-1, 1]
    config = pipe.vae.config
    z = encode_latents(pipe.vae, x)  # the posterior mean, as the training cache stores it
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    shift = getattr(config, "shift_factor", None)
    if shift is not None:  # FLUX's VAE; the inverse of sampling.decode_latents
        z = (z - shift) * config.scaling_factor
    elif mean is not None and std is not None:  # the inverse of sampling.decode_latents
        z = (
            (z - torch.tensor(mean).view(1, -1, 1, 1))
            * config.scaling_factor
            / torch.tensor(std).view(1, -1, 1, 1)
        )
    else:
        z = z * config.scaling_factor
    return ZipReference(z, prompt)


class ZipMergers:
    """m_c and m_s per LoRA key (vectors over the layer's input features). A key missing from one dict means
    that LoRA has no merger there (not covered, or a text-encoder module): a merger of 1.
    Not a dataclass on purpose: config helpers unpack dataclasses into dicts, and a config may hold mergers."""

    def __init__(
        self,
        m_c: dict[str, Tensor] | None = None,
        m_s: dict[str, Tensor] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.m_c = dict(m_c or {})
        self.m_s = dict(m_s or {})
        self.metadata = dict(metadata or {})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix.lower() != ".safetensors":
            raise UserInputError(f"{path}: ZipLoRA mergers are written as .safetensors")
        tensors = {f"content/{k}": v.detach().float().contiguous() for k, v in self.m_c.items()}
        tensors.update({f"style/{k}": v.detach().float().contiguous() for k, v in self.m_s.items()})
        return atomic_save_safetensors(path, tensors, self.metadata)

    @classmethod
    def load(cls, path: str | Path) -> ZipMergers:
        path = Path(path)
        if not path.is_file():
            raise UserInputError(f"{NAME}: mergers file {path} does not exist")
        out = cls()
        with safe_open(str(path), framework="pt") as f:
            out.metadata = dict(f.metadata() or {})
            for name in f.keys():
                role, _, key = name.partition("/")
                if role not in ("content", "style") or not key:
                    raise LoraFormatError(
                        f"{path}: {name!r} is not a ZipLoRA merger (content/<key>, style/<key>)"
                    )
                (out.m_c if role == "content" else out.m_s)[key] = f.get_tensor(name)
        return out


@dataclass(frozen=True)
class ZipTrainReport:
    steps: int  # optimiser steps taken
    converged: bool  # stopped because the mean |cos| fell below stop_similarity
    seconds: float
    loss: list[float]  # total loss per step
    mse: list[float]  # content + style reconstruction terms per step
    similarity: list[float]  # mean over layers of |cos(m_c, m_s)| after each step


class _Branches:
    """Forward hooks that add the content and/or style update to each LoRA'd layer's output, with or without
    the mergers, depending on `mode`: None (base), "content", "style" or "merged". One set of hooks serves the
    reference and the merged forwards, so both see exactly the same base computation."""

    def __init__(self, pipe: Any, content: LoraState, style: LoraState, w_c: float, w_s: float) -> None:
        comps = components_of(pipe)
        self.mode: str | None = None
        self.layers: dict[str, tuple[nn.Module, dict[str, tuple[Tensor, Tensor]]]] = {}
        for role, state, weight in (("content", content, w_c), ("style", style, w_s)):
            for key, ref in resolve(pipe, state).items():
                module = comps[ref.component].get_submodule(ref.path)
                layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
                if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                    raise UserInputError(f"{NAME}: {key}: grouped convolutions are not supported")
                entry = self.layers.setdefault(key, (module, {}))
                down, up = layer_factors(state.modules[key], layer, weight)
                entry[1][role] = (down.to(layer.weight.device), up.to(layer.weight.device))
        self.mergers = {
            role: {
                key: nn.Parameter(torch.ones(branches[role][0].shape[1], device=branches[role][0].device))
                for key, (module, branches) in self.layers.items()
                if role in branches and key.split(".", 1)[0] in DENOISERS  # none in text encoders (see docstring)
            }
            for role in ("content", "style")
        }
        self.handles = [
            module.register_forward_hook(self._hook(key)) for key, (module, _) in self.layers.items()
        ]

    def _hook(self, key: str):
        module, branches = self.layers[key]
        layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module

        def hook(_module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if self.mode is None:
                return None
            roles = ("content", "style") if self.mode == "merged" else (self.mode,)
            x = args[0].float()
            extra = None
            for role in roles:
                if role not in branches:
                    continue
                down, up = branches[role]
                merger = self.mergers[role].get(key) if self.mode == "merged" else None
                h = (
                    x
                    if merger is None
                    else x * (merger[:, None, None] if isinstance(layer, nn.Conv2d) else merger)
                )
                if isinstance(layer, nn.Conv2d):
                    h = F.conv2d(h, down, None, layer.stride, layer.padding, layer.dilation)
                    h = F.conv2d(h, up)
                else:
                    h = F.linear(F.linear(h, down), up)
                extra = h if extra is None else extra + h
            return None if extra is None else output + extra.to(output.dtype)

        return hook

    @contextmanager
    def use(self, mode: str | None) -> Iterator[None]:
        previous, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = previous

    def shared(self) -> list[str]:
        return [k for k in self.mergers["content"] if k in self.mergers["style"]]

    def similarity(self) -> Tensor:
        """Σ_l |cos(m_c,l, m_s,l)| over layers with both mergers (a 0-dim tensor with grad)."""
        terms = [
            F.cosine_similarity(self.mergers["content"][k], self.mergers["style"][k], dim=0).abs()
            for k in self.shared()
        ]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@contextmanager
def _objective(
    pipe: Any,
    content: LoraState,
    style: LoraState,
    refs: tuple[ZipReference, ZipReference],
    w_c: float,
    w_s: float,
) -> Iterator[Any]:
    """Yields `loss(generator, similarity_weight) -> (L, mse terms, Σ|cos|)` and the branches; the pipe is
    unchanged afterwards (hooks removed, requires_grad restored)."""
    for ref, role in zip(refs, ("content", "style"), strict=True):
        if not isinstance(ref, ZipReference):
            raise UserInputError(f"{NAME}: {role}_ref must be a ZipReference (see encode_reference)")
    family = family_of(pipe)
    unet = family.denoiser(pipe)
    objective = uniform_objective(family.objective, pipe.scheduler.config)
    params = [p for root in components_of(pipe).values() for p in root.parameters()]
    grad_flags = [p.requires_grad for p in params]
    branches = _Branches(pipe, content, style, w_c, w_s)
    try:
        for p in params:  # only the mergers learn; no gradient buffers for the base
            p.requires_grad_(False)

        def condition(ref: ZipReference, mode: str) -> Conditioning:
            h, w = (n * pipe.vae_scale_factor for n in ref.latents.shape[-2:])
            with (
                torch.no_grad(),
                branches.use(mode),
            ):  # the text encoders of the model this forward stands for
                return encode_prompts(
                    pipe, [ref.prompt], None, num_images=1, clip_skip=0, height=h, width=w
                ).cond

        # (reference, its single-LoRA model, its conditioning there, its conditioning in the merged model)
        tasks = [
            (ref, mode, condition(ref, mode), condition(ref, "merged"))
            for ref, mode in zip(refs, ("content", "style"), strict=True)
        ]

        def loss(generator: torch.Generator, similarity_weight: float) -> tuple[Tensor, Tensor, Tensor]:
            mse = torch.zeros(())
            for ref, mode, cond_ref, cond_merged in tasks:
                x0 = ref.latents.to(unet.device, unet.dtype)
                # the same x_t and t for both forwards, drawn by the family's training objective
                noised = objective.draw(x0, generator)
                noisy, t = family.pack_latents(noised.noisy), noised.timesteps
                h, w = (n * pipe.vae_scale_factor for n in x0.shape[-2:])
                model_fn = family.model_fn(unet, height=h, width=w)
                with torch.no_grad(), branches.use(mode):
                    target = model_fn(noisy, t, cond_ref)
                with branches.use("merged"):
                    pred = model_fn(noisy, t, cond_merged)
                mse = mse + F.mse_loss(pred.float(), target.float())
            similarity = branches.similarity()
            return mse + similarity_weight * similarity, mse, similarity

        yield loss, branches
    finally:
        branches.remove()
        for p, flag in zip(params, grad_flags, strict=True):
            p.requires_grad_(flag)


def train_ziplora(
    pipe: Any,
    content: LoraState,
    style: LoraState,
    content_ref: ZipReference,
    style_ref: ZipReference,
    *,
    content_weight: float = 1.0,
    style_weight: float = 1.0,
    max_steps: int = 100,
    lr: float = 0.01,
    similarity_weight: float = 0.01,
    stop_similarity: float = 0.05,
    seed: int = 0,
) -> tuple[ZipMergers, ZipTrainReport]:
    """Learn the mergers (see the module docstring); the pipe is unchanged afterwards. A CPU generator seeded
    `seed` draws each step's noise and timesteps, so a run reproduces."""
    start = time.perf_counter()
    refs = (content_ref, style_ref)
    with _objective(pipe, content, style, refs, content_weight, style_weight) as (objective, branches):
        mergers = [*branches.mergers["content"].values(), *branches.mergers["style"].values()]
        optimizer = torch.optim.Adam(mergers, lr=lr)
        generator = torch.Generator().manual_seed(seed)
        n_shared = len(branches.shared())
        losses: list[float] = []
        mses: list[float] = []
        sims: list[float] = []
        converged = False
        for _ in range(max_steps):
            with torch.enable_grad():
                loss, mse, _ = objective(generator, similarity_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                similarity = branches.similarity().item() / max(n_shared, 1)  # mean |cos| after the step
            losses.append(loss.item())
            mses.append(mse.item())
            sims.append(similarity)
            if n_shared and similarity < stop_similarity:
                converged = True
                break
        learned = [
            {k: v.detach().clone() for k, v in branches.mergers[r].items()} for r in ("content", "style")
        ]
    report = ZipTrainReport(len(losses), converged, time.perf_counter() - start, losses, mses, sims)
    settings = {
        "content_weight": content_weight, "style_weight": style_weight, "lr": lr, "similarity_weight":
        similarity_weight, "stop_similarity": stop_similarity, "seed": seed, "steps": report.steps,
        "converged": converged, "similarity": sims[-1] if sims else None,
    }  # fmt: skip
    return ZipMergers(*learned, {MERGERS_METADATA_KEY: json.dumps(settings)}), report


@torch.no_grad()
def ziplora_loss(
    pipe: Any,
    content: LoraState,
    style: LoraState,
    content_ref: ZipReference,
    style_ref: ZipReference,
    mergers: ZipMergers | None = None,
    *,
    content_weight: float = 1.0,
    style_weight: float = 1.0,
    similarity_weight: float = 0.01,
    seed: int = 0,
    draws: int = 4,
) -> float:
    """The ZipLoRA objective L for given mergers (None: all 1), averaged over `draws` (noise, timestep) pairs
    from a CPU generator seeded `seed`: to compare mergers on the same draws."""
    refs = (content_ref, style_ref)
    with _objective(pipe, content, style, refs, content_weight, style_weight) as (objective, branches):
        for role, given in (
            ("content", mergers.m_c if mergers else {}),
            ("style", mergers.m_s if mergers else {}),
        ):
            for key, param in branches.mergers[role].items():
                if key in given:
                    param.copy_(given[key])
        generator = torch.Generator().manual_seed(seed)
        return sum(objective(generator, similarity_weight)[0].item() for _ in range(draws)) / draws
