"""`benchmarks.realsize`'s goal rows, each in a fresh process: what one row costs with nothing left behind by another.

Why: inside one process the same base sampling took 3.4 s before a K-LoRA `inplace` plan and 1.95 s after it was
closed (bit-identical weights), so a row's time depended on which row ran before it (what the allocator holds,
which pages are warm). Here every measurement is its own process: build the model (as realsize does), make the
plan, sample one warm-up image, then time --images images; rows alternate (base, klora, craft, base, ...) so slow
drift of a shared machine falls on all of them. "x base" is the median over rounds of row / base of the same round
(ACFG over plain CFG, as in realsize).

    OMP_NUM_THREADS=1 python -m benchmarks.realsize_rows [--base sd15] [--rounds 3] [--images 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from benchmarks.common import print_table, write_result
from benchmarks.timing import spread

ROWS = ("base", "klora", "craft")
GOALS = {"klora": 1.05, "craft": 1.10}


def one_row(base: str, row: str, size: int, steps: int, images: int) -> list[float]:
    """Runs in the child process: seconds of each timed image of `row`."""
    import warnings

    import torch

    from benchmarks.realsize import PROMPT, _loras, build
    from lorafuse.fusion.registry import get_method, make_config
    from lorafuse.fusion.sampling import sample

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    pipe = build(base)
    content, style, (craft_c, craft_s) = _loras(pipe, 16)
    kwargs: dict = {"guidance": 5.0}  # SD: the base row is plain CFG, the reference of both goals
    if row != "base":
        c, s = (craft_c, craft_s) if row == "craft" else (content, style)
        plan = get_method(row)().plan(pipe, c, s, make_config(row))
        kwargs = {"hooks": plan.hooks, "guidance": plan.guidance(5.0)}
    common = dict(steps=steps, seed=0, height=size, width=size, output="latent", progress=False)

    def timed() -> float:
        start = time.perf_counter()
        sample(pipe, PROMPT, **common, **kwargs)
        return time.perf_counter() - start

    timed()  # warm-up: first-call costs and a plan's one-off merges
    return [timed() for _ in range(images)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # SD bases only: on FLUX.1 K-LoRA's reference (no true CFG) and ACFG's (true CFG) differ; realsize has both
    ap.add_argument("--base", default="sd15", choices=["sd15", "sdxl"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--row", help=argparse.SUPPRESS)  # the child's entry
    args = ap.parse_args()
    if args.row:
        print("SECONDS", *one_row(args.base, args.row, args.size, args.steps, args.images), flush=True)
        return
    rows = ROWS
    medians: dict[str, list[float]] = {row: [] for row in rows}
    for r in range(args.rounds):
        for row in rows:
            cmd = [sys.executable, "-m", "benchmarks.realsize_rows", "--base", args.base, "--row", row,
                   "--images", str(args.images), "--size", str(args.size), "--steps", str(args.steps)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            seconds = [float(x) for line in out.splitlines() if line.startswith("SECONDS") for x in line.split()[1:]]
            medians[row].append(statistics.median(seconds))
            print(f"  round {r + 1}/{args.rounds} {row}: {medians[row][-1]:.3f} s per image", flush=True)
    ratio = {row: spread([t / b for t, b in zip(medians[row], medians["base"], strict=True)]) for row in rows}
    print(f"\n{args.base}, {args.size} px, {args.steps} steps, one process per row and round; goals: K-LoRA <= "
          f"{GOALS['klora']}x base, ACFG <= {GOALS['craft']}x plain CFG")  # fmt: skip
    print_table(["row", "s per image (median)", "x base (median)", "IQR"],
                [[row, statistics.median(medians[row]), ratio[row]["median"],
                  f"{ratio[row]['q25']:.3f}-{ratio[row]['q75']:.3f}"] for row in rows])  # fmt: skip
    write_result(f"realsize_rows_{args.base}", vars(args), {"seconds": medians, "ratio": ratio})


if __name__ == "__main__":
    main()
