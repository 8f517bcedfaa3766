"""Fusion methods and the one sampling loop they share (`sample`)."""

from lorafuse.fusion.sampling import SampleResult, sample

__all__ = ["SampleResult", "sample"]
