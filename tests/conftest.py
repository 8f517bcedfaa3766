"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_flux():
    """tiny_flux(seed=0) -> a new flux-tiny pipeline (models/tiny_flux.py): real FLUX.1 classes at tiny width."""
    from lorafuse.models.tiny_flux import tiny_flux_pipeline

    return tiny_flux_pipeline
