"""`lorafuse fuse`: fuse a content and a style LoRA and write the images, a labelled grid and a JSON record.

lorafuse fuse --content C.safetensors --style S.safetensors --method klora --prompt "..." --out DIR
              [--base world|PATH] [--set opt=value ...] [--config method.toml] [--steps 25 --seed 0 ...]
lorafuse fuse ... --method all      every registered method with the same seeds, side by side in one grid

Each method is one call of `lorafuse.fuse`. With `--method all`, `--set` options go to the methods that have
them, `--config` holds one table per method (`[klora]`, `[switch]`, ...), and a method that cannot run with
these inputs (e.g. ZipLoRA without reference images) is skipped with its reason in the record.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lorafuse.cli import options
from lorafuse.cli.options import add_device_arguments, seed
from lorafuse.errors import ConfigError, LoraFormatError, UserInputError

ALL = "all"


class _HelpWithMethods(argparse.Action):
    """-h/--help: the usual help plus one line per fusion method. The registry (torch, diffusers) is imported
    only when help is asked for, so `lorafuse --help` and every other command stay fast."""

    def __call__(self, parser, namespace, values, option_string=None):
        from lorafuse.fusion.options_doc import methods_help

        parser.epilog = (
            f"methods (--method NAME):\n{methods_help()}\n  all  every method above, same seeds, side by side\n\n"
            "options of one method: lorafuse fuse --method NAME --help-options"
        )
        parser.print_help()
        parser.exit()


class _HelpOptions(argparse.Action):
    """--help-options [NAME]: the options of NAME, else of the method given with --method before it (every
    method for 'all')."""

    def __call__(self, parser, namespace, values, option_string=None):
        from lorafuse.fusion.options_doc import options_help
        from lorafuse.fusion.registry import get_method, method_names

        method = values or namespace.method
        names = method_names() if method == ALL else [method]
        try:
            for name in names:
                get_method(name)
        except UserInputError as e:
            parser.error(str(e))
        print("\n\n".join(options_help(n) for n in names))
        parser.exit()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fuse",
        help="fuse a content and a style LoRA and sample images",
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fuse a content (subject) LoRA and a style LoRA with one fusion method, or all of them with "
        "the same seeds, and write the images, a labelled grid and a JSON record.",
    )
    p.add_argument("-h", "--help", action=_HelpWithMethods, nargs=0, help="show this help and the methods")
    p.add_argument(
        "--help-options",
        action=_HelpOptions,
        nargs="?",
        metavar="NAME",
        help="list the options of a method (NAME, or the one given by --method): types, defaults, accepted "
        "ranges; then exit",
    )
    p.add_argument("--content", type=Path, required=True, help="content (subject) LoRA file")
    p.add_argument("--style", type=Path, required=True, help="style LoRA file")
    p.add_argument("--method", default="klora", help="a fusion method name, or 'all' (default: klora)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--base",
        default="world",
        help="world (default), sd15-tiny, sdxl-tiny, a folder or a checkpoint, or a TOML config naming FLUX.1's "
        "separate files (pretrained_model_name_or_path, ae, clip_l, t5xxl)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="OPT=VALUE", help="a method option; repeatable"
    )
    p.add_argument(
        "--config", type=Path, help="TOML file of method options ([method] tables with --method all)"
    )
    add_device_arguments(p)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, help="CFG scale (default: the base's, 7.5 for SD, 1 = none for FLUX.1)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument(
        "--scheduler", default="default", help="ddim (the SD default), euler or dpmpp; FLUX.1 uses its own flow-match Euler"
    )
    p.add_argument(
        "--allow-pickle", action="store_true", help="also read .ckpt/.pt/.bin (torch.load weights_only)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_fuse)


def parse_sets(items: list[str]) -> dict[str, str]:
    """A fusion method's `--set OPTION=VALUE` options."""
    return options.parse_sets(items, "selection=random", form="OPTION=VALUE")


def _method_tables(path: Path, methods: list[str]) -> dict[str, dict[str, Any]]:
    from lorafuse.config.toml_io import read_toml

    data = read_toml(path)
    unknown = sorted(k for k in data if k not in methods)
    bad = sorted(k for k, v in data.items() if not isinstance(v, dict))
    if unknown or bad:
        raise ConfigError(
            f"{path}: with --method all the file holds one table per method ({', '.join(methods)}); "
            f"found {', '.join(unknown or bad)}"
        )
    return data


def _options_per_method(methods: list[str], sets: dict[str, str], config: Path | None) -> dict[str, Any]:
    """(config, options) per method for --method all; a --set key that no method has is an error."""
    from lorafuse.fusion.registry import get_method

    tables = _method_tables(config, methods) if config else {}
    fields = {m: set(get_method(m).config_cls.__dataclass_fields__) for m in methods}
    unused = sorted(k for k in sets if not any(k in f for f in fields.values()))
    if unused:
        raise UserInputError(f"--set {', '.join(unused)}: no fusion method has such an option")
    return {m: {**tables.get(m, {}), **{k: v for k, v in sets.items() if k in fields[m]}} for m in methods}


def cmd_fuse(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from lorafuse.fusion.api import fuse, load_base, precheck_pair
    from lorafuse.fusion.klora_schedule import record_heatmap
    from lorafuse.fusion.markers import strip_markers
    from lorafuse.fusion.registry import make_config, method_names
    from lorafuse.fusion.sampling import check_counts
    from lorafuse.utils.atomic import atomic_write_text, check_output
    from lorafuse.utils.images import labelled_grid, save_image
    from lorafuse.utils.inputs import check_input_file

    sets = parse_sets(args.set)
    methods = method_names() if args.method == ALL else [args.method]
    # Options first, for every method: a typo fails before the base model loads or anything samples.
    skipped: dict[str, str] = {}
    if args.method == ALL:
        options = _options_per_method(methods, sets, args.config)
        configs = {m: (None, options[m]) for m in methods}
        for method in methods:
            try:
                make_config(method, None, **options[method])
            except ConfigError as e:  # a typo or a wrong type: the user's mistake, stop
                raise ConfigError(f"{args.config or '--set'}: {e}") from None
            except UserInputError as e:  # e.g. ZipLoRA without reference images: this method cannot run
                skipped[method] = str(e)
                print(f"skipped {method}: {e}", file=sys.stderr)
        methods = [m for m in methods if m not in skipped]
    else:
        configs = {args.method: (args.config, sets)}
        make_config(args.method, args.config, **sets)
    # the prompt, the LoRA paths and the output folder too: each mistake must show before the base loads
    strip_markers(args.prompt)
    check_counts(args.num_images, args.steps, args.seed)
    for path in (args.content, args.style):
        check_input_file(path, "LoRA file", LoraFormatError)
    precheck_pair(args.content, args.style, args.method, allow_pickle=args.allow_pickle)
    check_output(args.out, kind="folder", what="output folder", estimate=estimate_output_bytes(args, methods))
    pipe = load_base(args.base, device=args.device, dtype=args.dtype)
    common = dict(
        prompt=args.prompt, base=pipe, negative_prompt=args.negative_prompt, num_images=args.num_images,
        steps=args.steps, guidance=args.guidance, seed=args.seed, scheduler=args.scheduler,
        progress=not args.no_progress, allow_pickle=args.allow_pickle,
    )  # fmt: skip

    rows, labels, records = [], [], {}
    for method in tqdm(methods, desc="methods", disable=args.no_progress or len(methods) == 1):
        config, opts = configs[method]
        try:
            cfg = make_config(method, config, **opts)
            result = fuse(args.content, args.style, method=method, config=cfg, **common)
        except UserInputError as e:
            if args.method != ALL:
                raise
            skipped[method] = str(e)
            print(f"skipped {method}: {e}", file=sys.stderr)
            continue
        result.record["base"] = args.base  # the pipeline object was passed in; record what the user named
        images = result.uint8()
        args.out.mkdir(parents=True, exist_ok=True)  # only once there is something to write
        for k, image in enumerate(images):
            save_image(_pil(image), args.out / f"{method}_{k:02d}.png")
        # K-LoRA's (layer x step) choices, as the paper's Figure 6; nothing for methods without a schedule
        record_heatmap(result.record["plan"], args.out / f"{method}_schedule.png")
        rows.append(list(images))
        labels.append(method)
        records[method] = result.record
    if not rows:
        raise UserInputError(f"no method could run: {json.dumps(skipped)}")

    seeds = [f"seed {args.seed + k}" for k in range(len(rows[0]))]
    title = f"{args.content.name} + {args.style.name}: {args.prompt}"
    save_image(labelled_grid(rows, labels, seeds, title=title[:120]), args.out / "grid.png")
    record = records[methods[0]] if args.method != ALL else {"methods": records, "skipped": skipped}
    atomic_write_text(args.out / "record.json", json.dumps(record, indent=1, ensure_ascii=False))
    print(f"wrote {len(rows) * len(rows[0])} images, grid.png and record.json to {args.out}")
    return 0


# a record's fixed part (method settings, sampling, the LoRAs' paths, timings; the largest seen is under 2 kB)
_RECORD_BASE = 16 << 10
# a record's part per (layer, step): K-LoRA's schedule holds "true,"/"false," on an indented line
_RECORD_PER_STEP = 8


def _lora_modules(path: Path) -> set[str]:
    """The module names of a LoRA file, from its tensor names (the header alone for safetensors): a name less
    its factor and ".weight" ("X.lora_down.weight", "X.lora_A.weight", "X.alpha", "X.hada_w1_a" -> "X")."""
    from lorafuse.lora.io import read_tensors

    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    else:
        keys = list(read_tensors(path, allow_pickle=True)[0])
    return {k.rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in keys}


def record_bytes(method: str, content: Path, style: Path, steps: int) -> int:
    """An upper bound of one fused sample's JSON record: its fixed part, and for K-LoRA (the one method with a
    per-layer record) per layer the names twice (a kohya name is at most 40 characters longer than the file's
    module name), k / top_c / top_s and the schedule; the layers are bounded by the two LoRAs' modules."""
    if method != "klora":
        return _RECORD_BASE
    modules = _lora_modules(content) | _lora_modules(style)
    name = max((len(k) for k in modules), default=0)
    return _RECORD_BASE + len(modules) * (2 * (name + 40) + 3 * 32 + steps * _RECORD_PER_STEP)


def estimate_output_bytes(args: argparse.Namespace, methods: list[str]) -> int:
    """An upper bound of what this command writes into --out, from the inputs alone (before the base loads):
    per method its images and record, K-LoRA's schedule heatmap, and the grid of all."""
    from lorafuse.fusion.klora_schedule import heatmap_pixels
    from lorafuse.models.meta import sample_side
    from lorafuse.utils.atomic import png_bytes
    from lorafuse.utils.images import grid_size

    side = sample_side(args.base)
    total = png_bytes(*grid_size(len(methods), args.num_images, (side, side), methods, title="t"))
    for method in methods:
        total += args.num_images * png_bytes(side, side) + record_bytes(method, args.content, args.style, args.steps)
    if "klora" in methods:
        layers = len(_lora_modules(args.content) | _lora_modules(args.style))
        total += png_bytes(*heatmap_pixels(layers, args.steps), channels=4)
    return total


def _pil(image):
    from PIL import Image

    return Image.fromarray(image)
