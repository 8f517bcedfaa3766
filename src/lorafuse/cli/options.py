"""Command-line options that several subcommands share."""

from __future__ import annotations

import argparse

from lorafuse.errors import UserInputError


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """--device and --dtype for commands that load a base model (checked before it loads)."""
    p.add_argument("--device", default=None, help="where the base runs: cpu (default), cuda, cuda:1, mps")
    p.add_argument(
        "--dtype", default=None, choices=("fp32", "fp16", "bf16"), help="the base's precision (default: fp32)"
    )


def split_set(item: str, example: str, form: str = "KEY=VALUE") -> tuple[str, str]:
    """One `--set KEY=VALUE` as (key, value), the key stripped; the error shows `form` and a valid `example`."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UserInputError(f"--set {item!r}: expected {form}, e.g. --set {example}")
    return key.strip(), value


def parse_sets(items: list[str], example: str, form: str = "KEY=VALUE") -> dict[str, str]:
    """Every `--set KEY=VALUE` as {key: value}, both stripped; a later one wins."""
    return {key: value.strip() for key, value in (split_set(item, example, form) for item in items)}


def add_num_processes_argument(p: argparse.ArgumentParser, what: str, note: str) -> None:
    """--num-processes N: the command relaunches itself under `accelerate launch`; `what` and `note` frame it."""
    p.add_argument(
        "--num-processes",
        type=int,
        default=1,
        metavar="N",
        help=f"{what} (runs `accelerate launch --num_processes N`; GPUs, or CPUs on gloo); {note}",
    )


MAX_SEED = 2**63 - 1 - 10**6  # torch and numpy take 64-bit seeds; each image or pair adds its index to the seed


def seed(text: str) -> int:
    """argparse type of every --seed: an int in [0, MAX_SEED] (numpy's generators refuse negative seeds, torch's
    overflow past 64 bits), so a bad seed is a usage error, not a traceback after the model loaded."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: give a whole number") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed {value} is out of range: give a number from 0 to {MAX_SEED}")
    return value
