"""Guidance policies and timestep schedules; the sampling loop is `lorafuse.fusion.sampling.sample`."""

from lorafuse.guidance.base import (
    COND,
    UNCOND,
    Conditioning,
    FunctionHook,
    Guidance,
    GuidanceCond,
    ModelFn,
    StepHook,
    UNetDenoiser,
)
from lorafuse.guidance.cfg import BranchContext, ClassifierFreeGuidance, CompositeGuidance, cfg_combine

CFG = ClassifierFreeGuidance

__all__ = [
    "CFG",
    "COND",
    "UNCOND",
    "BranchContext",
    "ClassifierFreeGuidance",
    "CompositeGuidance",
    "Conditioning",
    "FunctionHook",
    "Guidance",
    "GuidanceCond",
    "ModelFn",
    "StepHook",
    "UNetDenoiser",
    "cfg_combine",
]
