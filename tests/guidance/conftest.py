"""Shared pieces for the guidance tests: a tiny SD1.5 UNet, random conditioning, a per-row stand-in adapter."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
import torch

from lorafuse.guidance import Conditioning, GuidanceCond, UNetDenoiser
from lorafuse.models.tiny import tiny_unet

# Tests run with --import-mode=importlib, so test modules cannot import this file: helpers are fixtures.
B = 2  # images per batch


class RowAdapter:
    """Stand-in for a LoRA with per-sample ("mixed batch") support: adds a fixed offset to conv_in's output,
    on every row or only on the rows marked True. Uses a forward hook, so the UNet's code is untouched."""

    def __init__(self, unet: torch.nn.Module, seed: int = 1, strength: float = 0.5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.unet = unet
        self.delta = strength * torch.randn(1, unet.conv_in.out_channels, 1, 1, generator=g)

    @contextmanager
    def active(self, rows: Sequence[bool] | None = None) -> Iterator[None]:
        def add(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            on = torch.ones(len(out)) if rows is None else torch.tensor(rows, dtype=out.dtype)
            assert len(on) == len(out), "one flag per row of the forward"
            return out + on.view(-1, 1, 1, 1) * self.delta

        handle = self.unet.conv_in.register_forward_hook(add)
        try:
            yield
        finally:
            handle.remove()


@pytest.fixture(scope="session")
def model_fn() -> UNetDenoiser:
    return UNetDenoiser(tiny_unet("sd15", seed=0))


@pytest.fixture(scope="session")
def cond(model_fn: UNetDenoiser) -> GuidanceCond:
    g = torch.Generator().manual_seed(0)
    dim = model_fn.unet.config.cross_attention_dim
    # (B, L, D) with a short L: the UNet does not care about the sequence length
    return GuidanceCond(
        cond=Conditioning(torch.randn(B, 7, dim, generator=g)),
        uncond=Conditioning(torch.randn(B, 7, dim, generator=g)),
    )


@pytest.fixture(scope="session")
def latents() -> torch.Tensor:
    return torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(2))  # (B, C, h, w)


@pytest.fixture
def adapter(model_fn: UNetDenoiser) -> RowAdapter:
    return RowAdapter(model_fn.unet)
