"""`lorafuse craft ...`: the CRAFT-LoRA preparation steps (fusion itself is `lorafuse fuse --method craft`).

lorafuse craft pairs --out DIR [--mode render|generate] [--base world] [--content X ...] [--style Y ...]
    contrastive content/style pairs (10 x 10 by default on the world) with a contact sheet
lorafuse craft backbone CONFIG.toml [--set key=value ...]
    train the rank-limited backbone W' on a pairs folder; writes OUTPUT_DIR/backbone (a diffusers pipeline)
lorafuse craft expert --out FILE --pair INDIVIDUAL:STYLE [--pair ...] [--grid 0,0.5,1] [--seeds 2]
    train the expert encoder on the world: the best λ pair per prompt wording on a λ grid (oracle-scored)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorafuse.cli.options import seed


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("craft", help="CRAFT-LoRA: contrastive pairs and the rank-limited backbone")
    sub = p.add_subparsers(dest="craft_command", metavar="STEP", required=True)

    pairs = sub.add_parser("pairs", help="write a contrastive content/style pairs dataset")
    pairs.add_argument("--out", type=Path, required=True, help="dataset folder")
    pairs.add_argument(
        "--mode",
        choices=("render", "generate"),
        default="render",
        help="render: exact world renders (default); generate: DCT frequency mixing with the base",
    )
    pairs.add_argument("--base", default="world", help="base model for --mode generate (default: world)")
    pairs.add_argument(
        "--content",
        action="append",
        default=None,
        metavar="X",
        help="a content reference (world individual for render, prompt for generate); repeatable",
    )
    pairs.add_argument(
        "--style",
        action="append",
        default=None,
        metavar="Y",
        help="a style reference (world style for render, prompt for generate); repeatable",
    )
    pairs.add_argument("--seed", type=seed, default=0)
    pairs.add_argument("--steps", type=int, default=25)
    pairs.add_argument("--guidance", type=float, default=7.5)
    pairs.add_argument("--cutoff", type=float, default=0.35, help="Gaussian low-pass cutoff σ (normalised)")
    pairs.set_defaults(func=cmd_pairs)

    bb = sub.add_parser("backbone", help="train the rank-limited backbone W' (PaRa-style)")
    bb.add_argument(
        "config", type=Path, help="TOML file of backbone settings (lorafuse.backbone.train.BackboneConfig)"
    )
    bb.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting; repeatable"
    )
    bb.add_argument("--no-progress", action="store_true")
    bb.set_defaults(func=cmd_backbone)

    ex = sub.add_parser("expert", help="train the expert encoder on the built-in world's λ grid")
    ex.add_argument("--out", type=Path, required=True, help="expert encoder file (.safetensors)")
    ex.add_argument("--pair", action="append", required=True, metavar="INDIVIDUAL:STYLE",
                    help="a LoRA pair to run the grid on, e.g. teapot_08:crayon; repeatable")  # fmt: skip
    ex.add_argument(
        "--work-dir", type=Path, default=Path("out/craft_loras"), help="where the LoRAs are cached"
    )
    ex.add_argument("--grid", default="0,0.25,0.5,0.75,1", help="λ values on both axes")
    ex.add_argument("--seeds", type=int, default=2)
    ex.add_argument("--steps", type=int, default=15)
    ex.add_argument("--guidance", type=float, default=4.0)
    ex.add_argument("--expert-steps", type=int, default=500)
    ex.set_defaults(func=cmd_expert)


def cmd_pairs(args: argparse.Namespace) -> int:
    from lorafuse.backbone.pairs import build_pairs_dataset

    folder = build_pairs_dataset(
        args.out, mode=args.mode, base=args.base, contents=args.content, styles=args.style, seed=args.seed,
        steps=args.steps, guidance=args.guidance, cutoff=args.cutoff,
    )  # fmt: skip
    print(folder / "contact_sheet.png")
    return 0


def cmd_backbone(args: argparse.Namespace) -> int:
    from lorafuse.backbone.train import load_backbone_config, train_backbone
    from lorafuse.cli.fuse import parse_sets

    config = load_backbone_config(args.config, parse_sets(args.set) or None)
    print(train_backbone(config, progress=not args.no_progress))
    return 0


def cmd_expert(args: argparse.Namespace) -> int:
    from lorafuse.errors import UserInputError
    from lorafuse.eval.expert_world import parse_pair, train_world_expert
    from lorafuse.fusion.craft.expert_data import lambda_grid

    try:
        values = [float(v) for v in args.grid.split(",")]
    except ValueError:
        raise UserInputError(
            f"--grid wants comma-separated numbers such as 0,0.5,1, got {args.grid!r}"
        ) from None
    pairs = [parse_pair(p) for p in args.pair]  # every pair checked before any LoRA trains
    from lorafuse.utils.atomic import check_output

    check_output(args.out, what="expert file", estimate=estimate_expert_bytes(pairs))
    check_output(args.work_dir, kind="folder", what="LoRA work folder",
                 estimate=estimate_loras_bytes(pairs, args.work_dir))  # fmt: skip
    path, _ = train_world_expert(pairs, args.work_dir, args.out, grid=lambda_grid(values), seeds=args.seeds,
                                 steps=args.steps, guidance=args.guidance, expert_steps=args.expert_steps)  # fmt: skip
    print(path)
    return 0


def estimate_loras_bytes(pairs: list[tuple[str, str]], work_dir) -> int:
    """An upper bound of what the work folder gains: CRAFT's content and style LoRA of each pair not trained yet
    (the recipes `train_world_expert` trains), with their datasets."""
    from lorafuse.train.world_personalize import estimate_recipe_bytes, style_recipe, subject_recipe

    recipes = {r for i, s in pairs for r in (subject_recipe(i, layers="craft"), style_recipe(s, layers="craft"))}
    return sum(estimate_recipe_bytes(r, work_dir) for r in recipes)


def estimate_expert_bytes(pairs: list[tuple[str, str]]) -> int:
    """The expert file: the encoder's parameters (float32) over the world base's text width, one id per individual,
    and a header and config."""
    import torch

    from lorafuse.fusion.craft.expert import ExpertEncoder
    from lorafuse.models.meta import meta_components

    width = sum(c.config.hidden_size for k, c in meta_components("world").items() if k.startswith("text_encoder"))
    with torch.device("meta"):
        model = ExpertEncoder(width, num_ids=len({i for i, _ in pairs}))
    return sum(4 * p.numel() for p in model.parameters()) + _EXPERT_HEADER


_EXPERT_HEADER = 64 << 10  # the file's header: a dozen tensor entries and the encoder's config as metadata
