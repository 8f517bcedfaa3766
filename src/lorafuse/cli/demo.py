"""`lorafuse demo`"""

from __future__ import annotations

import argparse

from lorafuse.demo import DemoConfig, run_demo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the built-in world demo and write out/demo/report.html")
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default=None, help="a pipeline folder to use instead of the built-in base model")
    p.set_defaults(func=lambda a: run_demo(DemoConfig(out=a.out, steps=a.steps, seed=a.seed, base=a.base)) and 0)
