"""Shared pieces for the LoRA format tests: tiny pipelines, random LoRAs that cannot pass by accident, assets."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import BaseModules, base_modules

# Tests run with --import-mode=importlib, so test modules cannot import this file: helpers are fixtures.
REPO = Path(__file__).resolve().parents[2]
LORA_ASSETS = REPO.parent / "shared" / "assets" / "loras" / "sd15"


@pytest.fixture
def lora_assets() -> Path:
    """../shared/assets/loras/sd15 from the repo root; tests using it skip when it is absent."""
    if not LORA_ASSETS.is_dir():
        pytest.skip(f"real LoRA assets not found at {LORA_ASSETS}")
    return LORA_ASSETS


@functools.lru_cache(maxsize=2)
def _cached_pipeline(arch: str):
    from lorafuse.models.tiny import tiny_pipeline

    return tiny_pipeline(arch, seed=0)


@pytest.fixture(scope="session")
def tiny():
    """tiny(arch) -> a shared, read-only tiny pipeline. Tests that modify a pipeline build their own."""
    return _cached_pipeline


def _random_lora(
    base: object,
    *,
    seed: int = 0,
    ranks: tuple[int, ...] = (2, 4),
    alphas: tuple[float | None, ...] = (1.0, 2.0, 3.0, None),
    keep=None,
    scale: float = 0.2,
) -> LoraState:
    """A LoRA on every Linear / Conv2d of `base` (or those `keep(key)` accepts), with random non-zero up AND
    down (never the zero-B init, so outputs really change), mixed ranks and alphas, LoCon on 3x3 convs."""
    modules: BaseModules = base_modules(base)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, LoraModule] = {}
    for i, (key, ref) in enumerate(sorted(modules.modules.items())):
        if keep is not None and not keep(key):
            continue
        rank = ranks[i % len(ranks)]
        out_f, in_f, *kernel = ref.shape
        down = torch.randn((rank, in_f, *kernel), generator=g) * scale
        up = torch.randn((out_f, rank, *([1, 1] if kernel else [])), generator=g) * scale
        out[key] = LoraModule(down=down, up=up, alpha=alphas[i % len(alphas)])
    return LoraState(modules=out)


def effective_alpha(module: LoraModule) -> float:
    return float(module.alpha) if module.alpha is not None else float(module.rank)


def _assert_same_lora(a: LoraState, b: LoraState) -> None:
    """Same keys, bit-identical factors (and dtypes), same effective alpha."""
    assert set(a.modules) == set(b.modules)
    for key, ma in a.modules.items():
        mb = b.modules[key]
        assert ma.down.dtype == mb.down.dtype and ma.up.dtype == mb.up.dtype, key
        assert torch.equal(ma.down, mb.down), key
        assert torch.equal(ma.up, mb.up), key
        assert effective_alpha(ma) == effective_alpha(mb), key


@pytest.fixture(scope="session")
def random_lora():
    return _random_lora


@pytest.fixture(scope="session")
def assert_same_lora():
    return _assert_same_lora

