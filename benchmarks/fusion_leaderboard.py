"""Which fusion method keeps the most of both LoRAs? Every method on held-out individual x style pairs of the
built-in world, judged by the oracle encoders (ground truth), with 95 % intervals and the time per image.

Per pair: a content LoRA (5 images of a held-out individual) and a style LoRA (1 image of a held-out style),
trained by `train.world_personalize` with its default recipes (plus CRAFT's disjoint-layer pair), then
`eval.world_compare.compare_pair`: the base, each LoRA alone and every method, with the same prompt template
and the same noise seeds for every method and pair. Intervals: Student t over every image of a method (pairs x
seeds) for the similarities, Wilson for the right_* rates. Pairs: held-out individuals (`<class>_08`, then
`<class>_09`) in class order, styles crayon / blueprint / mosaic in turn, so the first pairs are all different
individuals and every style appears.

Full run (the README's table; about 4 LoRAs x ~40 s per pair on an idle 2-core CPU, then ~1 min of sampling):
    python -m benchmarks.fusion_leaderboard --pairs 10 --seeds 4
Smoke run (checks, not figures; writes fusion_leaderboard_smoke.json):
    python -m benchmarks.fusion_leaderboard --pairs 2 --seeds 1

LoRAs and per-pair results are cached under --work (default out/leaderboard, not in git): a rerun with the
same settings only redoes what is missing. The HTML report goes to WORK/report.html.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

from benchmarks.common import print_table, write_result
from lorafuse.errors import UserInputError
from lorafuse.eval.html import HtmlReport
from lorafuse.eval.report import FILES, group_stats
from lorafuse.eval.world_compare import (
    SCORES,
    compare_pair,
    scores_bar_chart,
    side_by_side,
    summary,
    train_pair_loras,
)
from lorafuse.utils.atomic import atomic_write_text
from lorafuse.world.catalog import CLASS_NAMES, HELD_OUT_STYLES, INDIVIDUALS_PER_CLASS, SEEN_INDIVIDUALS

FULL = {"pairs": 10, "seeds": 4}  # the bar; fewer is a smoke run
README_METRICS = (
    "oracle_content",
    "oracle_style",
    "right_individual",
    "right_style",
    "oracle_hmean",
    "oracle_ci",
)


def held_out_pairs(n: int) -> list[tuple[str, str]]:
    """The first n (individual, style) pairs: every held-out individual once with styles in turn, then again
    with the next style, so each combination comes at most once."""
    individuals = [
        f"{c}_{i:02d}" for i in range(SEEN_INDIVIDUALS, INDIVIDUALS_PER_CLASS) for c in CLASS_NAMES
    ]
    pairs = [(ind, HELD_OUT_STYLES[(j + r) % len(HELD_OUT_STYLES)]) for r in range(len(HELD_OUT_STYLES))
             for j, ind in enumerate(individuals)]  # fmt: skip
    if not 1 <= n <= len(pairs):
        raise UserInputError(f"--pairs must be in 1..{len(pairs)} (held-out individuals x styles), got {n}")
    return pairs[:n]


def run_pair(pipe, oracle, individual: str, style: str, args, methods: list[str], work: Path) -> dict:
    """The rows of one pair, from WORK/pairs/<pair>/result.json when it was made with these settings."""
    settings = {"content": {}, "style": {}}
    if args.content_epochs:
        settings["content"]["epochs"] = args.content_epochs
    if args.style_epochs:
        settings["style"]["epochs"] = args.style_epochs
    from lorafuse.train.world_personalize import base_fingerprint, style_recipe, subject_recipe
    from lorafuse.world.oracle import default_oracle_path

    # a cached result is reused only when the same LoRAs (recipe keys hash the base's weights too) are judged by
    # the same oracle weights with the same sampling settings
    key = {"methods": methods, "seeds": args.seeds, "seed": args.seed, "steps": args.steps,
           "guidance": args.guidance, "recipes": settings,
           "lora_keys": [subject_recipe(individual, **settings["content"]).key(),
                         style_recipe(style, **settings["style"]).key()],
           "base": base_fingerprint("world"), "oracle": base_fingerprint(str(default_oracle_path()))}  # fmt: skip
    signature = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    folder = work / "pairs" / f"{individual}+{style}"
    cached = folder / "result.json"
    if cached.is_file():
        done = json.loads(cached.read_text())
        if done.get("signature") == signature:
            return done
    loras = train_pair_loras(individual, style, work, methods=methods, content_settings=settings["content"],
                             style_settings=settings["style"], progress=not args.no_progress)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # CRAFT and B-LoRA use part of each LoRA by design; they say so each time
        result = compare_pair(pipe, loras, oracle=oracle, methods=methods, seeds=args.seeds, seed=args.seed,
                              steps=args.steps, guidance=args.guidance, progress=not args.no_progress)  # fmt: skip
    from lorafuse.utils.images import save_image

    save_image(side_by_side(result, title=f"{result.pair}: {result.prompt}"), folder / "side_by_side.png")
    done = {"signature": signature, "pair": result.pair, "prompt": result.prompt, "seeds": result.seeds,
            "skipped": result.skipped, "rows": result.rows}  # fmt: skip
    atomic_write_text(cached, json.dumps(done, indent=1))
    return done


def figures_of(rows: list[dict], metrics=SCORES) -> dict:
    out: dict[str, dict] = {}
    for metric in metrics:
        for (method,), iv in group_stats(rows, ["method"], metric).items():
            out.setdefault(method, {})[metric] = {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n}
    return out


def markdown_table(figures: dict, command: str) -> str:
    """The README's table: mean [95 % interval] per method, then seconds per image."""

    def cell(d: dict | None) -> str:
        if not d:
            return ""
        return f"{d['mean']:.3f}" if d["n"] < 2 else f"{d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"

    lines = [
        f"| method | {' | '.join(README_METRICS)} | s / image |",
        "|" + " --- |" * (len(README_METRICS) + 2),
    ]
    for method, f in figures.items():
        spi = f.get("seconds_per_image", {}).get("mean")
        lines.append(f"| {method} | {' | '.join(cell(f.get(m)) for m in README_METRICS)} | "
                     f"{'' if spi is None else f'{spi:.2f}'} |")  # fmt: skip
    return "\n".join(lines) + f"\n\n`{command}`"


def write_html(work: Path, done: list[dict], rows: list[dict], args, elapsed: float) -> Path:
    folder = work / FILES
    report = HtmlReport(f"lorafuse fusion leaderboard: {len(done)} pairs x {args.seeds} seed(s)")
    report.paragraph(f"Every method on held-out individual x style pairs of the built-in world, {args.steps} DDIM "
                     f"steps, guidance {args.guidance}, noise seeds {args.seed}..{args.seed + args.seeds - 1} for "
                     f"every method. Mean [95 % interval] over every image of a method; {elapsed:.0f} s.")  # fmt: skip
    header, table = summary(rows)
    report.heading("Scores per method")
    report.table(header, table)
    scores_bar_chart(rows, folder / "scores.png", title="oracle scores, all pairs (mean, 95 % interval)")
    report.image(f"{FILES}/scores.png", "content and style similarity and their harmonic mean")
    scores_bar_chart(rows, folder / "rates.png", metrics=("right_individual", "right_style"),
                     title="the oracle names the right individual / style (rate, 95 % Wilson interval)")  # fmt: skip
    report.image(f"{FILES}/rates.png", "right individual and right style rates")
    report.heading("Harmonic mean per pair")
    header, table = summary(rows, metrics=("oracle_hmean",), by=("pair", "method"))
    report.table(header, table)
    report.heading("Pictures")
    for d in done:
        report.image(f"pairs/{d['pair']}/side_by_side.png", d["pair"])
        for label, reason in d["skipped"].items():
            report.paragraph(f"{d['pair']}: skipped {label}: {reason}")
    return report.write(work / "report.html")


def main() -> None:
    from lorafuse.fusion.api import load_base
    from lorafuse.fusion.registry import get_method, method_names
    from lorafuse.world.oracle import default_oracle

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=FULL["pairs"], help="held-out (individual, style) pairs")
    ap.add_argument("--seeds", type=int, default=FULL["seeds"], help="noise seeds per pair and method")
    ap.add_argument("--seed", type=int, default=0, help="first noise seed")
    ap.add_argument("--steps", type=int, default=25, help="sampling steps")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument(
        "--methods", default=None, help="comma-separated fusion methods (default: all registered)"
    )
    ap.add_argument("--content-epochs", type=int, default=None, help="override the content recipe's epochs")
    ap.add_argument("--style-epochs", type=int, default=None, help="override the style recipe's epochs")
    ap.add_argument("--work", type=Path, default=Path("out/leaderboard"), help="LoRA and result cache")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else method_names()
    for m in methods:
        get_method(m)  # unknown names fail before any training
    if args.seeds < 1 or args.steps < 1:
        raise UserInputError(f"--seeds and --steps must be at least 1, got {args.seeds} and {args.steps}")
    pairs = held_out_pairs(args.pairs)

    t0 = time.perf_counter()
    pipe, oracle = load_base("world"), default_oracle()
    done = [run_pair(pipe, oracle, ind, sty, args, methods, args.work) for ind, sty in pairs]
    elapsed = time.perf_counter() - t0
    rows = [r for d in done for r in d["rows"]]

    header, table = summary(rows)
    print(f"\n{len(pairs)} pairs x {args.seeds} seed(s), {args.steps} steps, guidance {args.guidance}")
    print_table(header, table)
    figures = figures_of(rows)
    smoke = args.pairs < FULL["pairs"] or args.seeds < FULL["seeds"]
    command = " ".join(["python -m benchmarks.fusion_leaderboard", *sys.argv[1:]])  # as run, every flag
    print("\n" + markdown_table(figures, command) + "\n")
    page = write_html(args.work, done, rows, args, elapsed)
    print(f"report: {page}")
    config = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "methods": methods,
              "pairs_used": [f"{i}+{s}" for i, s in pairs], "smoke": smoke, "seconds": round(elapsed, 1)}  # fmt: skip
    figures["skipped"] = {d["pair"]: d["skipped"] for d in done if d["skipped"]}
    write_result("fusion_leaderboard_smoke" if smoke else "fusion_leaderboard", config, figures)


if __name__ == "__main__":
    main()
