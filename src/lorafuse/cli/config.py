"""`lorafuse config import KOHYA.toml --out OURS.toml`: convert a kohya config and print the mapping table."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("config", help="convert configs (kohya sd-scripts -> lorafuse)")
    sub = p.add_subparsers(dest="config_command", metavar="ACTION")
    imp = sub.add_parser(
        "import",
        help="convert a kohya train_network.py TOML (kohya_ss GUI format) to a lorafuse config",
        description="Read a kohya train_network.py / sdxl_train_network.py / flux_train_network.py config file (and "
        "the dataset_config it names), print what each key becomes, and write the equivalent lorafuse config. Keys lorafuse cannot "
        "reproduce are refused with the reason; nothing is dropped silently.",
    )
    imp.add_argument("kohya_config", type=Path, help="kohya flat TOML (train_network.py --config_file)")
    imp.add_argument("--out", type=Path, required=True, help="where to write the lorafuse TOML")
    imp.set_defaults(func=cmd_import)
    p.set_defaults(func=lambda args: p.print_help() or 1)


def cmd_import(args: argparse.Namespace) -> int:
    from lorafuse.config.toml_io import config_from_dict, save_config
    from lorafuse.errors import ConfigError
    from lorafuse.train.config import TrainConfig
    from lorafuse.train.kohya_gui_preset import check_not_gui_settings
    from lorafuse.train.kohya_import import convert_flat, flatten_sections, looks_like_kohya, read_toml
    from lorafuse.utils.atomic import check_output

    check_not_gui_settings(args.kohya_config)
    data = read_toml(args.kohya_config)
    check_not_gui_settings(args.kohya_config, data)
    check_output(args.out, what="config file")
    if not looks_like_kohya(data):
        raise ConfigError(f"{args.kohya_config}: already a lorafuse config (only tables at the top level)")
    data = flatten_sections(data)
    check_not_gui_settings(args.kohya_config, data)
    imported = convert_flat(data)
    print(imported.table())
    imported.check(str(args.kohya_config))
    cfg = config_from_dict(TrainConfig, imported.data, f"{args.kohya_config} (converted)")
    save_config(cfg, args.out)
    print(f"wrote {args.out}")
    return 0
