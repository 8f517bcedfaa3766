"""`lorafuse` command line: a thin layer over the Python API.

Each subcommand lives in its own module under `lorafuse.cli` exposing `register(subparsers)`, which adds its
parser and sets `func` to a function of the parsed args. User errors (`UserInputError`) print one line and exit
with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from lorafuse import __version__
from lorafuse.errors import UserInputError

# subcommand modules, in the order `lorafuse --help` lists them
COMMAND_MODULES = ("demo", "world", "dataset", "lora_tools", "bake", "train", "config", "fuse", "grid", "report", "craft")
Register = Callable[[argparse._SubParsersAction], None]


def build_parser(extra: Sequence[Register] = (), modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    """The parser of every subcommand in `modules`; `extra`: `register` functions of commands built above the
    CLI (`lorafuse ui`, added by the `lorafuse` entry point, `lorafuse.__main__`)."""
    parser = argparse.ArgumentParser(prog="lorafuse", description="Train, fuse and measure subject and style LoRAs.")
    parser.add_argument("--version", action="version", version=f"lorafuse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in modules:
        # every name must import: a typo is an error, not a subcommand silently missing
        importlib.import_module(f"lorafuse.cli.{name}").register(sub)
    for register in extra:
        register(sub)
    return parser


# Libraries that announce optional backends (torchvision, bitsandbytes kernels) or deprecations on import: their
# chatter would come before, and bury, lorafuse's own one-line error. Their real errors still raise.
_QUIET_LOGGERS = ("transformers", "diffusers", "bitsandbytes", "kernels", "accelerate", "peft", "torchao", "huggingface_hub",
                  "torch.utils._pytree")  # torchao registers enums with torch.compile on import and torch warns


def quiet_libraries() -> None:
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|diffusers|torch|torchvision|peft|accelerate|bitsandbytes|huggingface_hub)(\.|$)")  # fmt: skip


def warm_up(modules: Sequence[str]) -> None:
    """Quiet the libraries, then import `modules` ahead of their first use (the web UI's helper and job worker).
    A missing optional one is skipped: the command that needs it reports it."""
    quiet_libraries()
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _show_warning(command: str):
    """lorafuse's own warnings as one line, `lorafuse CMD: warning: ...`, without the source line."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("lorafuse"):
            print(f"lorafuse {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None, extra: Sequence[Register] = (), modules: Sequence[str] = COMMAND_MODULES) -> int:
    try:
        quiet_libraries()
        parser = build_parser(extra, modules)  # imports the commands' modules: Ctrl-C may land here too
    except KeyboardInterrupt:
        print("lorafuse: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    previous = warnings.showwarning
    warnings.showwarning = _show_warning(args.command)
    # lorafuse's logged warnings (skipped dataset files, ...) in the same one-line form as its errors
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(f"lorafuse {args.command}: %(levelname_lower)s: %(message)s"))
    handler.addFilter(_lower_level)
    package_log = logging.getLogger("lorafuse")
    package_log.addHandler(handler)
    from lorafuse.utils import atomic

    atomic.forget_created_folders()
    try:
        result = args.func(args)
    except UserInputError as exc:
        atomic.discard_created_folders()
        print(f"lorafuse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # every write is atomic: what was complete stays (a grid's cells, a training run's saved states),
        # nothing half-written does; the output folders this run created and left empty go too
        atomic.discard_created_folders()
        print(f"lorafuse {args.command}: interrupted (Ctrl-C); finished files were kept, nothing half-written "
              "was left", file=sys.stderr)  # fmt: skip
        return 130
    except OSError as exc:
        message = _write_error(exc)
        if message is None:
            raise
        atomic.discard_created_folders()
        print(f"lorafuse {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = previous
        package_log.removeHandler(handler)
        atomic.forget_created_folders()
    return int(result or 0)


# errors of the OS that say where a file could not be written, not that lorafuse has a bug: one line naming it
_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EEXIST}


def _write_error(exc: OSError) -> str | None:
    from lorafuse.utils.atomic import is_disk_full

    name = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    if is_disk_full(exc):
        return f"{name}the disk is full; free some space and run again"
    if exc.errno in _WRITE_ERRNOS and name:
        return f"{name}{(exc.strerror or str(exc)).lower()}"
    return None


def _lower_level(record: logging.LogRecord) -> bool:
    record.levelname_lower = record.levelname.lower()
    return True


if __name__ == "__main__":
    sys.exit(main())
