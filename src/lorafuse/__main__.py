"""The `lorafuse` command: the CLI's subcommands plus `lorafuse ui`, which sits above the CLI it drives."""

import sys

from lorafuse.cli.main import main as cli_main
from lorafuse.ui.command import register as register_ui


def main(argv: list[str] | None = None) -> int:
    return cli_main(argv, extra=(register_ui,))


if __name__ == "__main__":
    sys.exit(main())
