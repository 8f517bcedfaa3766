"""Schedulers by short name, built from the pipeline's own scheduler config (its noise schedule and spacing)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    SchedulerMixin,
)

from lorafuse.errors import UserInputError


def _ddim(config: Any) -> SchedulerMixin:
    # DDIM's default clip_sample=True clips the predicted x0 to [-1, 1], which is wrong for latents (they are not
    # images). diffusers' SD pipelines turn it off when the config does not set it (a deprecation in
    # StableDiffusionPipeline.__init__); do the same so "ddim" on a PNDM-config pipeline matches diffusers.
    return DDIMScheduler.from_config(config, **({} if "clip_sample" in config else {"clip_sample": False}))


_BUILDERS: dict[str, Callable[[Any], SchedulerMixin]] = {
    "ddim": _ddim,
    "euler": EulerDiscreteScheduler.from_config,
    "dpmpp": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
}
SCHEDULERS = tuple(_BUILDERS)


def check_scheduler_name(name: str | None) -> None:
    if name is not None and name not in _BUILDERS:
        raise UserInputError(
            f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}, or None for the pipeline's own"
        )


def make_scheduler(pipe: DiffusionPipeline, name: str | None) -> SchedulerMixin:
    """A new scheduler; None copies the pipeline's. Always a fresh object because schedulers keep per-run
    state (step index, DPM-Solver's history) and `pipe.scheduler` must stay untouched."""
    check_scheduler_name(name)
    config = pipe.scheduler.config
    if name is None:
        return type(pipe.scheduler).from_config(config)
    return _BUILDERS[name](config)
