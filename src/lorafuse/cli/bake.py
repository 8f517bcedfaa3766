"""`lorafuse bake --base BASE --lora FILE [WEIGHT] ... --out DIR`: a base with LoRAs fused in, as a new pipeline."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorafuse.errors import UserInputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bake", help="fuse LoRAs into a base and save it as a new pipeline folder")
    p.add_argument("--base", default="world", help="world, a diffusers folder or a .safetensors checkpoint, or a TOML "
                   "config naming FLUX.1's separate files (then baked into one diffusers folder)")
    p.add_argument("--lora", nargs="+", action="append", required=True, metavar="FILE [WEIGHT]",
                   help="a LoRA file and its weight (default 1); repeatable")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="new pipeline folder")
    p.add_argument("--allow-pickle", action="store_true", help="also read .ckpt/.pt LoRA files (runs their code)")
    p.set_defaults(func=cmd_bake)


def parse_lora_args(groups: list[list[str]]) -> list[tuple[str, float]]:
    pairs = []
    for group in groups:
        if len(group) > 2:
            raise UserInputError(f"--lora takes a file and an optional weight, got {' '.join(group)}")
        try:
            weight = float(group[1]) if len(group) == 2 else 1.0
        except ValueError:
            raise UserInputError(f"--lora {group[0]} {group[1]}: the weight must be a number") from None
        pairs.append((group[0], weight))
    return pairs


def cmd_bake(args: argparse.Namespace) -> int:
    from lorafuse.lora.bake import bake_loras

    out = bake_loras(args.base, parse_lora_args(args.lora), args.out, allow_pickle=args.allow_pickle)
    print(out)
    return 0
