"""`lorafuse ui`: the web UI over the same API as the CLI. Registered by the entry point (`lorafuse.__main__`),
since the UI sits above the CLI whose command lines it runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorafuse.errors import UserInputError
from lorafuse.ui.auth import GENERATE, TOKEN_ENV


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ui",
        help="start the web UI (dataset, train, LoRA tools, fuse, compare, jobs)",
        description="Start the web UI on 127.0.0.1. Long work runs as jobs in a worker process; their state "
        "lives in WORKSPACE/jobs, so closing the browser or restarting `lorafuse ui` loses nothing. "
        f"Login token (needed by --listen), first match wins: --auth-file PATH, --auth TOKEN|generate, then the "
        f"environment variable {TOKEN_ENV}. Prefer the file or the variable: a command line is visible to every "
        "user of the machine (ps). The token is not passed on to the jobs.",
    )
    p.add_argument("--workspace", type=Path, default=Path("lorafuse-workspace"),
                   help="the one folder the UI reads and writes (default: ./lorafuse-workspace)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--listen", action="store_true",
                   help="accept connections from other machines (binds 0.0.0.0; needs a token, see above)")
    p.add_argument("--host", default=None, help="with --listen: the address to bind (default 0.0.0.0)")
    p.add_argument("--auth", metavar="TOKEN", default=None,
                   help="require this token as the login password (other users can see it in ps: prefer "
                        f"{TOKEN_ENV} or --auth-file); 'generate' makes a fresh one and prints it once")
    p.add_argument("--auth-file", metavar="PATH", default=None,
                   help="read the token from this file (one line; refused unless only you may read it: chmod 600)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="let jobs read .ckpt/.pt/.bin files (as the CLI's --allow-pickle); refused otherwise")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="upload size limit per file (MB)")
    p.set_defaults(func=cmd_ui)  # fmt: skip


def cmd_ui(args: argparse.Namespace) -> int:
    import sys

    from lorafuse.ui.auth import take_token
    from lorafuse.ui.server import binding, free_port, quiet_gradio, serve

    # refuse a bad token or binding before anything heavy is imported or any folder is created; the token leaves
    # os.environ here, before the helper and the job worker are started with a copy of it
    choice = take_token(args.auth, args.auth_file)
    for line in choice.warnings:
        print(f"lorafuse ui: warning: {line}", file=sys.stderr, flush=True)
    if choice.source == "--auth" and choice.token != GENERATE:
        # the helper process is started by multiprocessing, which hands it a copy of sys.argv (over a pipe)
        sys.argv = [_mask(a, choice.token) for a in sys.argv]
    bind = binding(listen=args.listen, auth=choice.token, port=args.port, host=args.host, source=choice.source)
    if bind.port == 0:
        bind = type(bind)(bind.host, free_port(), bind.token, bind.generated)
    quiet_gradio()
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserInputError("the web UI needs gradio: pip install 'lorafuse[ui]' (make test installs it)") from None
    from lorafuse.ui.app import build_app
    from lorafuse.ui.workspace import Workspace

    workspace = Workspace.create(args.workspace, allow_pickle=args.allow_pickle)
    max_upload = int(args.max_upload_mb * 2**20)
    serve(build_app(workspace, max_upload=max_upload), bind, workspace, max_upload=max_upload)
    return 0


def _mask(arg: str, token: str) -> str:
    return arg.replace(token, "<token>") if arg in (token, f"--auth={token}") else arg
