"""Command-line options that several subcommands share."""

from __future__ import annotations

import argparse


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """--device and --dtype for commands that load a base model (checked before it loads)."""
    p.add_argument("--device", default=None, help="where the base runs: cpu (default), cuda, cuda:1, mps")
    p.add_argument(
        "--dtype", default=None, choices=("fp32", "fp16", "bf16"), help="the base's precision (default: fp32)"
    )
