"""`lorafuse` command line: a thin layer over the Python API.

Each subcommand lives in its own module under `lorafuse.cli` exposing `register(subparsers)`, which adds its
parser and sets `func` to a function of the parsed args. User errors (`UserInputError`) print one line and exit
with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lorafuse import __version__
from lorafuse.errors import UserInputError

# subcommand modules, in the order `lorafuse --help` lists them
COMMAND_MODULES = (
    "demo",
    "world",
    "lora_tools",
    "bake",
    "train",
    "config",
    "fuse",
    "grid",
    "report",
    "craft",
    "ui",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafuse", description="Train, fuse and measure subject and style LoRAs."
    )
    parser.add_argument("--version", action="version", version=f"lorafuse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"lorafuse.cli.{name}")
        except ModuleNotFoundError as exc:  # a subcommand not written yet must not break the others
            if exc.name == f"lorafuse.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except UserInputError as exc:
        print(f"lorafuse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
