"""`lorafuse world ...`: render, list, write datasets, train the oracle and pretrain the base model."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lorafuse.cli.options import seed
from lorafuse.errors import UserInputError

# A contact sheet of poses: 256 rows of 64 px is already a 16k-pixel-tall PNG; far more only exhausts memory
# (every tile is rendered before the grid is drawn)
MAX_RENDER_ROWS = 256


def count(low: int, high: int | None = None):
    """argparse type: a whole number in [low, high], so a bad count is a usage error naming its option."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}: give a whole number") from None
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: give a number {bound}")
        return value

    return parse


def positive(text: str) -> float:
    """argparse type of a learning rate: a finite number above 0 (nan, inf or 0 would train to nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is out of range: give a finite number above 0")
    return value


def _cmd_list(args: argparse.Namespace) -> int:
    from lorafuse.world.catalog import HELD_OUT_STYLES, SEEN_STYLES, all_individuals

    print("seen styles:     ", ", ".join(SEEN_STYLES))
    print("held-out styles: ", ", ".join(HELD_OUT_STYLES))
    print("held-out individuals:", ", ".join(x.name for x in all_individuals(held_out=True)))
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    import numpy as np

    from lorafuse.utils.atomic import check_output, png_bytes
    from lorafuse.utils.images import grid_size, labelled_grid, save_image
    from lorafuse.world.catalog import check_style, parse_individual
    from lorafuse.world.dataset import SIDE
    from lorafuse.world.render import render

    ind = parse_individual(args.individual)
    styles = [check_style(s) for s in args.styles]
    labels = [f"seed {args.seed}.{k}" for k in range(args.n)]
    check_output(args.out, what="picture", estimate=png_bytes(*grid_size(args.n, len(styles), (SIDE, SIDE), labels)))
    tiles = [[render(ind, s, np.random.default_rng([args.seed, k]), size=SIDE) for s in styles] for k in range(args.n)]
    path = save_image(labelled_grid(tiles, labels, styles), args.out)
    print(path)
    return 0


def _cmd_dataset(args: argparse.Namespace) -> int:
    from lorafuse.train.world_personalize import SUBJECT_STYLES
    from lorafuse.world.dataset import write_style_dataset, write_subject_dataset

    if bool(args.subject) == bool(args.style):
        raise UserInputError("give exactly one of --subject NAME or --style NAME")
    if args.subject_styles and not args.subject:
        raise UserInputError("--subject-styles goes with --subject (a style dataset renders seen individuals)")
    # `is None`, not `or`: an explicit --n 0 or --repeats 0 is refused, not silently replaced by the default
    if args.subject:
        folder = write_subject_dataset(args.subject, args.out, n=_given(args.n, 5), repeats=_given(args.repeats, 10),
                                       trigger=args.trigger, styles=tuple(args.subject_styles or SUBJECT_STYLES),
                                       seed=args.seed)
    else:
        folder = write_style_dataset(args.style, args.out, n=_given(args.n, 1), repeats=_given(args.repeats, 20),
                                     trigger=args.trigger, seed=args.seed)
    print(folder)
    return 0


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


def _cmd_train_oracle(args: argparse.Namespace) -> int:
    import numpy as np

    # pool seeds 1, 3, 5, ...: the shipped oracle = 1400 steps on seed 1, then --init it --extra-pools 1 --lr 7e-4,
    # then --init it --decoded 12000 --lr 5e-4 (see the README)
    from lorafuse.utils.atomic import check_output
    from lorafuse.world.catalog import STYLE_NAMES, all_individuals
    from lorafuse.world.oracle_train import decoded_pool, train_oracle
    from lorafuse.world.pool import Pool, cached_pool, cached_pool_bytes, load_pool, save_pool

    work = Path(args.work)
    names = [work / ("oracle_pool.npz" if k == 0 else f"oracle_pool{2 * k + 1}.npz") for k in range(1 + args.extra_pools)]
    decoded = work / f"oracle_pool_decoded{args.decoded}.npz"  # keyed by size only: delete it if the base changes
    pools_bytes = sum(cached_pool_bytes(p, args.pool) for p in names)
    if args.decoded:
        pools_bytes += cached_pool_bytes(decoded, args.decoded)
    check_output(args.out, what="oracle file", estimate=oracle_file_bytes())
    check_output(work, kind="folder", what="work folder", estimate=pools_bytes)
    pools = [cached_pool(path, args.pool, all_individuals(), list(STYLE_NAMES), seed=2 * k + 1)
             for k, path in enumerate(names)]  # fmt: skip
    if args.decoded:
        from lorafuse.models.world import load_world_pipeline

        if not decoded.exists():
            save_pool(decoded_pool(pools[0], load_world_pipeline(args.decoded_by).vae, args.decoded), decoded)
        pools.append(load_pool(decoded))
    pool = Pool(*(np.concatenate([getattr(p, f) for p in pools]) for f in
                  ("images", "individual", "style", "caption_template")))
    print(train_oracle(pool, args.out, steps=args.steps, lr=args.lr, init=args.init))
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from lorafuse.train.world_pretrain import (
        PretrainConfig,
        cache_latents,
        finalize,
        finetune_decoder,
        train_unet,
        train_vae,
        unet_stages,
    )
    from lorafuse.utils.atomic import check_output
    from lorafuse.world.catalog import SEEN_STYLES, STYLE_NAMES, all_individuals
    from lorafuse.world.oracle import Oracle
    from lorafuse.world.pool import cached_pool

    pipeline, work_bytes = pretrain_bytes(args)
    check_output(args.out, kind="folder", what="pipeline folder", estimate=pipeline)
    work = check_output(args.work, kind="folder", what="work folder", estimate=work_bytes)
    cfg = PretrainConfig(work_dir=str(work), vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                         unet_batch=args.batch, seed=args.seed, caption_ft_steps=args.caption_ft_steps)
    pool = cached_pool(work / "base_pool.npz", args.pool, all_individuals(held_out=False), list(SEEN_STYLES), seed=2)
    vae = train_vae(cfg, pool)
    latents, scale = cache_latents(cfg, vae, pool)
    # the decoder fine-tune leaves the encoder (hence the cached latents) alone; doing it before the UNet
    # stages means their oracle curves judge samples through the decoder that ships
    everything = cached_pool(work / "all_pool.npz", ALL_POOL, all_individuals(), list(STYLE_NAMES), seed=1)
    finetune_decoder(cfg, vae, everything, steps=args.decoder_steps)
    oracle = Oracle.load(args.oracle) if args.oracle or _has_default_oracle() else None
    for stage in unet_stages(cfg):
        train_unet(cfg, pool, latents, scale, oracle=oracle, vae=vae, stage=stage)
    print(f"pipeline folder: {finalize(cfg, args.out)}")
    return 0


ALL_POOL = 39000  # renders of every individual and style the decoder fine-tune sees
# a saved pipeline's files beside its weights: configs, the scheduler, the CLIP tokenizer's vocab and merges
_PIPELINE_FILES = 4 << 20
# a safetensors file's header (tensor entries) for a model of a few hundred tensors
_HEADER = 256 << 10


def oracle_file_bytes() -> int:
    """The oracle weights file: every parameter and buffer in float32, and the header."""
    from lorafuse.world.oracle import OracleModel

    model = OracleModel()
    return sum(4 * t.numel() for t in (*model.parameters(), *model.buffers())) + _HEADER


def pretrain_bytes(args: argparse.Namespace) -> tuple[int, int]:
    """(the pipeline folder, what the work folder gains): upper bounds from the world base's component sizes
    (built on the meta device). Work: the two render pools, the VAE and its fine-tuned decoder, the cached
    latents (float16), per UNet stage a checkpoint (UNet and text encoder, their EMA copies and AdamW's two
    moments; twice while a save replaces the previous one) and an exported pipeline, and the tokenizer."""
    from lorafuse.models.meta import meta_components
    from lorafuse.world.pool import cached_pool_bytes

    comps = meta_components("world-random")
    size = {k: sum(t.numel() * t.dtype.itemsize for t in (*m.parameters(), *m.buffers())) for k, m in comps.items()}
    pipeline = sum(size.values()) + _PIPELINE_FILES + len(comps) * _HEADER
    work = Path(args.work)
    vae = comps["vae"].config
    latent = vae.latent_channels * (64 // 2 ** (len(vae.block_out_channels) - 1)) ** 2 * 2
    stages = 1 + (args.caption_ft_steps > 0)
    trained = size["unet"] + size["text_encoder"]
    total = cached_pool_bytes(work / "base_pool.npz", args.pool) + cached_pool_bytes(work / "all_pool.npz", ALL_POOL)
    total += 2 * (size["vae"] + _HEADER) + args.pool * latent + _PIPELINE_FILES
    total += stages * (4 * trained + pipeline) + 4 * trained  # and the second copy of a checkpoint in a save
    return pipeline, total


def _has_default_oracle() -> bool:
    from lorafuse.world.oracle import default_oracle_path

    return default_oracle_path().exists()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("world", help="the built-in world: render, datasets, oracle, base-model pretraining")
    ws = p.add_subparsers(dest="world_command", metavar="WORLD_COMMAND")

    q = ws.add_parser("list", help="list classes, styles and held-out individuals")
    q.set_defaults(func=_cmd_list)

    q = ws.add_parser("render", help="render an individual in some styles to a PNG grid")
    q.add_argument("individual", help="CLASS_NN, e.g. teapot_08")
    q.add_argument("--styles", nargs="+", default=["flat", "hatched", "watercolor", "neon"])
    q.add_argument("--n", type=count(1, MAX_RENDER_ROWS), default=2, help=f"poses (rows, at most {MAX_RENDER_ROWS})")
    q.add_argument("--seed", type=seed, default=0)
    q.add_argument("--out", default="out/render.png")
    q.set_defaults(func=_cmd_render)

    q = ws.add_parser("dataset", help="write a kohya-style dataset folder for a held-out subject or style")
    q.add_argument("out", help="output folder (must be new or empty)")
    q.add_argument("--subject", help="individual, e.g. teapot_08")
    q.add_argument("--style", help="style, e.g. crayon")
    q.add_argument("--n", type=count(1), default=None, help="images (default 5 for a subject, 1 for a style)")
    q.add_argument("--repeats", type=count(1), default=None, help="kohya repeats (folder prefix)")
    q.add_argument("--trigger", default="sks")
    q.add_argument("--subject-styles", nargs="+", default=None, metavar="STYLE",
                   help="seen styles a subject's images cycle through (default, as the demo's recipe: "
                        "striped pixel watercolor neon ink)")
    q.add_argument("--seed", type=seed, default=0)
    q.set_defaults(func=_cmd_dataset)

    q = ws.add_parser("train-oracle", help="train the oracle encoders (ground truth judges)")
    q.add_argument("--work", default="out/world_work")
    q.add_argument("--out", default="out/world_work/oracle.safetensors")
    q.add_argument("--steps", type=count(1), default=1400)
    q.add_argument("--pool", type=count(1), default=39000, help="rendered images per pool")
    q.add_argument("--extra-pools", type=count(0), default=0, help="more pools of fresh renders (seeds 3, 5, ...)")
    q.add_argument("--lr", type=positive, default=2e-3, help="peak learning rate (one cycle)")
    q.add_argument("--init", default=None, help="continue from these oracle weights instead of from scratch")
    q.add_argument("--decoded", type=count(0), default=0,
                   help="add this many renders sent through the base model's VAE (the codec every sample goes through)")
    q.add_argument("--decoded-by", default=None, help="pipeline folder whose VAE decodes them (default: shipped)")
    q.set_defaults(func=_cmd_train_oracle)

    q = ws.add_parser("pretrain", help="pretrain the built-in base model (VAE, text encoder, UNet); resumable")
    q.add_argument("--work", default="out/world_work", help="work folder: caches, checkpoints, logs")
    q.add_argument("--vae-steps", type=count(1), default=1200)
    q.add_argument("--unet-steps", type=count(1), default=7000)
    q.add_argument("--decoder-steps", type=count(1), default=1200, help="decoder-only fine-tune on every style")
    q.add_argument("--caption-ft-steps", type=count(0), default=1500,
                   help="stage 3b: continue the UNet with colour-free captions mixed in (0 skips it)")
    q.add_argument("--out", default="out/world_work/base", help="where the finished pipeline folder goes")
    q.add_argument("--batch", type=count(1), default=32)
    q.add_argument("--pool", type=count(1), default=48000)
    q.add_argument("--oracle", default=None, help="oracle weights for the accuracy curve (default: shipped)")
    q.add_argument("--seed", type=seed, default=0)
    q.set_defaults(func=_cmd_pretrain)
