"""`lorafuse demo`: one call of `lorafuse.demo.run_demo` (train, fuse with every method, score, report)."""

from __future__ import annotations

import argparse
import os

from lorafuse.cli.options import add_device_arguments, seed
from lorafuse.demo import DemoConfig, run_demo


def register(sub: argparse._SubParsersAction) -> None:
    d = DemoConfig()
    p = sub.add_parser(
        "demo", help="train, fuse and score on the built-in world; writes out/demo/report.html"
    )
    p.add_argument("--out", default=d.out, help=f"output folder (default: {d.out})")
    p.add_argument("--individual", default=d.individual, help=f"a world individual (default: {d.individual})")
    p.add_argument("--style", default=d.style, help=f"a world style (default: {d.style})")
    p.add_argument("--seeds", type=int, default=d.seeds, help=f"images per method (default: {d.seeds})")
    p.add_argument("--seed", type=seed, default=d.seed, help="first noise seed")
    p.add_argument("--steps", type=int, default=d.steps, help=f"sampling steps (default: {d.steps})")
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--methods", default=None, help="comma-separated fusion methods (default: all)")
    p.add_argument(
        "--content-epochs", type=int, default=None, help="content LoRA epochs (default: the recipe's)"
    )
    p.add_argument("--style-epochs", type=int, default=None, help="style LoRA epochs (default: the recipe's)")
    p.add_argument("--work", default=None, help="LoRA cache folder (default: OUT/work)")
    p.add_argument("--no-class-grid", action="store_true", help="skip the base model's class x style grid")
    p.add_argument("--base", default=None, help="a pipeline folder to use instead of the built-in base model")
    add_device_arguments(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)


def _run(a: argparse.Namespace) -> int:
    # the demo reads only built-in or local files; offline mode also stops bitsandbytes (imported with diffusers
    # when installed) from asking the Hub for a CPU kernel at import. Before anything imports huggingface_hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip()) if a.methods is not None else None
    run_demo(DemoConfig(out=a.out, individual=a.individual, style=a.style, seeds=a.seeds, seed=a.seed,
                        steps=a.steps, guidance=a.guidance, methods=methods, content_epochs=a.content_epochs,
                        style_epochs=a.style_epochs, work=a.work, class_grid=not a.no_class_grid, base=a.base,
                        device=a.device, dtype=a.dtype,
                        progress=not a.no_progress))  # fmt: skip
    return 0
