"""The `lorafuse` command: the CLI's subcommands plus `lorafuse ui`, which sits above the CLI it drives."""

import sys

from lorafuse.cli.main import COMMAND_MODULES
from lorafuse.cli.main import main as cli_main
from lorafuse.ui.command import register as register_ui


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # `lorafuse ui` needs no other subcommand's parser, and some of them import torch (the LoRA tools'), which
    # the page's process never needs: its quick commands run in a helper process (lorafuse.ui.helper)
    modules = () if args[:1] == ["ui"] else COMMAND_MODULES
    return cli_main(argv, extra=(register_ui,), modules=modules)


if __name__ == "__main__":
    sys.exit(main())
