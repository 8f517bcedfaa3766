"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# benchmarks/ is a folder of scripts beside the package, not installed: make `import benchmarks` work in every
# test (the slow reference implementations live there, beside the benchmarks that time them)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# No downloads at run time, even when `make test` runs without .ci/run's environment: importing diffusers or peft
# imports bitsandbytes (a dev dependency), which on CPUs with AVX512-BF16 asks the Hub for a kernel at import.
# Set before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_flux():
    """tiny_flux(seed=0) -> a new flux-tiny pipeline (models/tiny_flux.py): real FLUX.1 classes at tiny width."""
    from lorafuse.models.tiny_flux import tiny_flux_pipeline

    return tiny_flux_pipeline


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run where torch sees a GPU and are skipped elsewhere (CI, this project's machines)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
