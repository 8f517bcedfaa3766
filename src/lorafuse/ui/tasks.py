"""What the page's helper process runs (`helper.HELPER.call(fn, ...)`): the quick work that imports torch,
diffusers or the fusion registry. No gradio here: the helper imports this module, and only what it needs."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

from lorafuse.errors import UserInputError


def run_cli(argv: list[str], cwd: str) -> tuple[int, str, str]:
    """`lorafuse ARGV` with `cwd` as working folder: (exit code, stdout, stderr), as in a terminal."""
    from lorafuse.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        os.chdir(cwd)
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 2
        finally:
            os.chdir(previous)
    return code, out.getvalue(), err.getvalue()


def method_catalog() -> tuple[list[str], str]:
    """The registered fusion methods and their one-line summaries (`lorafuse fuse --help`)."""
    from lorafuse.fusion.options_doc import methods_help
    from lorafuse.fusion.registry import method_names

    return method_names(), methods_help()


def options_help(method: str) -> str:
    """`lorafuse fuse --method NAME --help-options`."""
    from lorafuse.fusion.options_doc import options_help

    return options_help(method)


def preset_values(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The training config of a world recipe (`lorafuse.train.world_personalize`), as flat 'table.key' values."""
    from lorafuse.config.toml_io import config_to_dict
    from lorafuse.train.world_personalize import style_recipe, subject_recipe, train_config

    recipe = subject_recipe("teapot_08", **settings) if kind == "subject" else style_recipe("crayon", **settings)
    cfg = config_to_dict(train_config(recipe, Path("datasets/x"), Path("runs/x")))
    return {f"{t}.{k}": v for t, table in cfg.items() for k, v in table.items()}


def train_config_toml(overrides: dict[str, str]) -> tuple[str, str]:
    """The checked config (the CLI's checks: unknown keys, types, ranges) as TOML, and its base model path."""
    from lorafuse.config.toml_io import dump_config
    from lorafuse.train.config import load_train_config

    cfg = load_train_config(None, overrides)  # with no file, its errors name only the key and the problem
    return dump_config(cfg), str(cfg.model.pretrained_model_name_or_path)


def check_grid_config(config: str, cwd: str) -> None:
    """`lorafuse grid CONFIG`'s own checks of the file (keys, types, ranges: steps >= 1, ...), so a bad form is
    refused on the page before it is queued, in the words the command would use."""
    from lorafuse.eval.grid_config import load_grid_config, plan_grid

    previous = os.getcwd()
    os.chdir(cwd)  # the message names the config as the command line would (workspace-relative)
    try:
        plan_grid(load_grid_config(config))  # reads and checks; the cells are not sampled
    finally:
        os.chdir(previous)


def latest_state(run_dir: str) -> str | None:
    """The newest resumable state folder of a run (by its saved step), as `lorafuse train` reads it."""
    from lorafuse.train.checkpoint import read_train_state

    best, step = None, -1
    for folder in Path(run_dir).glob("*-state"):
        if folder.name.startswith("."):  # an atomic write's temporary folder
            continue
        try:
            s = read_train_state(folder).progress.global_step
        except (UserInputError, OSError):  # half-written, gone, or from another version: not one to continue from
            continue
        if s > step:
            best, step = folder, s
    return str(best) if best else None
