"""`lorafuse train CONFIG.toml [--set key=value ...] [--network_dim 8 ...]`: one call of `train_lora`.

Every `TrainConfig` field is also a flag named as in kohya (`--network_dim`), so a kohya
command line mostly carries over; `--set table.key=value` reaches the same fields by dotted name. Precedence:
the TOML file, then `--set`, then the flags. The help text of each flag is the comment beside (or above) its
field in train/config.py, train/config_network.py and train/config_optim.py, so documenting a field there documents the CLI (and the web
UI's training form, generated from the same `lorafuse.train.options`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from pathlib import Path

from lorafuse.cli.options import add_num_processes_argument, split_set
from lorafuse.errors import UserInputError
from lorafuse.train.options import Option, options


def _help(opt: Option) -> str:
    from lorafuse.config.toml_io import type_name

    if opt.default is dataclasses.MISSING:
        tail = "required"
    elif opt.default is None:
        tail = "default: unset"
    else:
        shown = opt.default.as_posix() if isinstance(opt.default, Path) else opt.default
        tail = f"default: {json.dumps(shown) if isinstance(shown, (str, tuple, list)) else shown}"
    text = f"{opt.doc + ' ' if opt.doc else ''}[{opt.key}: {type_name(opt.type)}; {tail}]"
    return text.replace("%", "%%")  # argparse %-formats help strings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a LoRA (kohya options, TOML config)",
        usage="lorafuse train [CONFIG.toml] [--set KEY=VALUE ...] [--dry-run] [--estimate [--device-memory GB]] "
        "[--no-progress] [--FIELD VALUE ...]",
        description="Train a LoRA on a kohya-style dataset folder. Options come from CONFIG (TOML, one table per "
        "group below), then --set, then the flags; every flag is also a TOML key, shown in brackets.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lorafuse train examples/world_content_lora.toml\n"
        "  lorafuse train run.toml --set network.network_dim=16 --max_train_steps 200\n"
        "  lorafuse train run.toml --num-processes 2   # DDP: same as accelerate launch --num_processes 2 -m "
        "lorafuse train run.toml\n"
        "  lorafuse train run.toml --estimate --device-memory 24   # will it fit a 24 GB GPU? (loads nothing)",
    )
    p.add_argument("config", nargs="?", type=Path, help="TOML config file (tables [model], [dataset], ...)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting by dotted name, e.g. --set network.network_dim=8 (repeatable)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="check the config and dataset, print the plan, exit"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--estimate",
        action="store_true",
        help="print the expected peak memory (weights, LoRA, optimizer, activations, caches) and exit; loads no "
        "weights. Plan for a base you have not downloaded with --pretrained_model_name_or_path reference:sdxl",
    )
    p.add_argument(
        "--device-memory",
        type=float,
        default=None,
        metavar="GB",
        help="with --estimate: the GPU's memory in GiB (e.g. 24); says whether the run fits and what would make "
        "it fit. Default: the visible CUDA device's, none on a CPU",
    )
    add_num_processes_argument(p, "train in N processes with DDP", "train_batch_size is per process")
    seen: set[str] = set()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in options():
        if opt.name in seen:  # flags are the bare field names: they must stay unique across tables
            raise RuntimeError(f"config field name {opt.name!r} appears in two tables; flags would collide")
        seen.add(opt.name)
        group = groups.setdefault(opt.table, p.add_argument_group(f"[{opt.table}]"))
        kwargs: dict[str, typing.Any] = {"dest": f"cfg:{opt.key}", "default": None, "help": _help(opt)}
        if opt.is_bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif opt.is_sequence:
            kwargs.update(nargs="+", metavar="VALUE")
        else:
            kwargs["metavar"] = "VALUE"
        group.add_argument(f"--{opt.name}", **kwargs)
    _register_kohya_flags(p, seen)
    p.set_defaults(func=cmd_train)


def _register_kohya_flags(p: argparse.ArgumentParser, taken: set[str]) -> None:
    """kohya's options that are not our field names: accepted as flags and converted (or refused) by name."""
    from lorafuse.train.kohya_keys import RULES

    group = p.add_argument_group(
        "kohya options",
        "kohya train_network.py options without a field of the same name: converted, or refused "
        "with the reason (see `lorafuse config import`)",
    )
    for key, rule in sorted(RULES.items()):
        if key in taken:
            continue
        what = {"map": f"-> {rule.target}", "note": "no effect here", "refuse": "refused unless off"}[
            rule.action
        ]
        kwargs: dict[str, typing.Any] = {"dest": f"kohya:{key}", "default": None, "metavar": "VALUE"}
        if key in ("network_args", "optimizer_args", "lr_scheduler_args", "text_encoder_lr"):
            kwargs["nargs"] = "*"
        else:
            kwargs.update(nargs="?", const="true")
        group.add_argument(f"--{key}", help=f"{what}: {rule.reason}".replace("%", "%%"), **kwargs)


def kohya_flags(args: argparse.Namespace) -> dict[str, typing.Any]:
    return {
        dest[len("kohya:") :]: value
        for dest, value in vars(args).items()
        if dest.startswith("kohya:") and value is not None
    }


def _flag_value(opt: Option, value: typing.Any) -> str:
    """A flag's argparse value as the override string `load_config` coerces."""
    if not isinstance(value, list):
        return value
    from lorafuse.lora.presets import PRESET_NAMES

    if opt.key == "network.layers" and len(value) == 1 and value[0] in PRESET_NAMES:
        return value[0]  # a preset name; anything else in `layers` is a list of regexes
    if opt.key == "dataset.resolution" and len(value) == 1:
        return value[0]  # "512" or kohya's "512,768" (comma-separated, as --resolution takes it in kohya)
    return json.dumps(value)  # a TOML array: prompts may contain commas


def collect_overrides(args: argparse.Namespace) -> dict[str, str]:
    by_name = {opt.name: opt for opt in options()}
    by_key = {opt.key: opt for opt in options()}
    overrides: dict[str, str] = {}
    for item in args.overrides:
        key, value = split_set(item, "network.network_dim=8")
        if key in by_name and "." not in key:
            key = by_name[key].key  # a bare field name is unique across tables
        overrides[key] = value
    for dest, value in vars(args).items():
        if dest.startswith("cfg:") and value is not None:
            key = dest[len("cfg:") :]
            overrides[key] = _flag_value(by_key[key], value)
    return overrides


def _estimate(cfg, device_memory: float | None) -> int:
    import torch

    from lorafuse.train.estimate import GB, check_fits, estimate_memory

    if device_memory is not None and device_memory <= 0:
        raise UserInputError(f"--device-memory {device_memory}: give the GPU's memory in GiB, e.g. 24")
    capacity = None if device_memory is None else int(device_memory * GB)
    if capacity is None and torch.cuda.is_available():
        capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if capacity is None:
        print(estimate_memory(cfg, device="cpu").format())
        return 0
    try:
        print(check_fits(cfg, capacity).format(capacity))
    except UserInputError as e:
        print(e)
        return 1
    return 0


# torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes") and CUDA's
# OutOfMemoryError ("CUDA out of memory. Tried to allocate 2.00 GiB ...") raise RuntimeError
_OOM = re.compile(r"can't allocate memory|out of memory", re.IGNORECASE)
_TRIED = re.compile(r"tried to allocate (\d+) bytes|tried to allocate ([\d.]+ [KMGT]iB)", re.IGNORECASE)


def out_of_memory(error: BaseException, config: Path | None) -> UserInputError | None:
    """A run that ran out of memory as one error naming the config and what to change (the config's size limits
    stop absurd values before any work; a plausible value can still exceed this machine, and on a CPU no estimate
    runs first); None for any other error."""
    if isinstance(error, RuntimeError) and not _OOM.search(str(error)):
        return None
    tried = _TRIED.search(str(error))
    size = ""
    if tried:
        amount = f"{int(tried[1]) / 1024**3:.2f} GiB" if tried[1] else tried[2]
        size = f" (it tried to allocate {amount} at once)"
    where = str(config) if config is not None else "command-line options"
    return UserInputError(
        f"{where}: the run ran out of memory{size}; `lorafuse train --estimate` shows what it needs: lower "
        "dataset.resolution or training.train_batch_size, or set training.gradient_checkpointing = true"
    )


def cmd_train(args: argparse.Namespace) -> int:
    import sys

    from lorafuse.config.toml_io import dump_config
    from lorafuse.train.kohya_import import load_train_config_any

    cfg, imported = load_train_config_any(args.config, collect_overrides(args), kohya_flags(args))
    if imported is not None:
        mapped = sum(r.action in ("mapped", "default") for r in imported.rows)
        print(
            f"kohya settings: {mapped} mapped, {len(imported.rows) - mapped} without effect here",
            file=sys.stderr,
        )
        for row in imported.rows:
            if row.action == "no effect" and row.detail != "off":
                print(f"  {row.key}: no effect here: {row.detail}", file=sys.stderr)
    if args.estimate:
        return _estimate(cfg, args.device_memory)
    if args.num_processes < 1:
        raise UserInputError(f"--num-processes {args.num_processes}: give 1 or more")
    if args.dry_run:
        from lorafuse.train.data import describe
        from lorafuse.train.run_setup import check_settings
        from lorafuse.train.scan import scan_dataset

        check_settings(cfg)
        print(dump_config(cfg))
        print(describe(scan_dataset(cfg.dataset), cfg.training))
        return 0
    from lorafuse.utils.launch import in_launched_process, relaunch

    if args.num_processes > 1 and not in_launched_process():
        words = ["train", *([str(args.config)] if args.config is not None else [])]
        words += [w for key, value in collect_overrides(args).items() for w in ("--set", f"{key}={value}")]
        return relaunch(args.num_processes, words + (["--no-progress"] if args.no_progress else []))
    from lorafuse.train.loop import train_lora

    try:
        result = train_lora(cfg, progress_bar=not args.no_progress)
    except (MemoryError, RuntimeError) as e:
        refusal = out_of_memory(e, args.config)
        if refusal is None:
            raise
        raise refusal from None
    if result.stopped:
        import shlex

        state = result.states[-1]
        again = ["lorafuse", "train", *([str(args.config)] if args.config else []), "--set", f"training.resume={state}"]
        print(f"stopped at step {result.global_step} of {result.total_steps}; state saved in {state}")
        print(f"  lora   {result.lora_path}")
        print(f"continue with: {shlex.join(again)}" + (" (and the same options)" if args.overrides else ""))
        # the run is unfinished (no final LoRA): 130, as any Ctrl-C'd command, so `train && fuse` stops here
        return 130
    print(f"trained {result.global_step} steps in {result.seconds:.0f} s ({result.arch})")
    for path in result.saved:
        print(f"  lora   {path}")
    for path in result.states:
        print(f"  state  {path}")
    for path in (result.config_path, result.log_csv, result.loss_plot, *result.samples):
        if path is not None:
            print(f"  file   {path}")
    return 0
