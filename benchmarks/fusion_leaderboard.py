"""Which fusion method keeps the most of both LoRAs, on the inputs its paper prescribes and on the LoRAs users have?
Every method on held-out individual x style pairs of the built-in world, judged by the oracle encoders (ground
truth), as paired differences to direct merging of the same LoRAs.

Per pair: a content LoRA (5 images of a held-out individual) and a style LoRA (1 image of a held-out style), trained
by `train.world_personalize` in four input sets (`eval.world_compare.INPUT_RECIPES`), each row labelled `method [inputs]`:
  [locon]  every layer with LoCon 3x3 convs, the recipes' default: the common LoRAs users have. Every method but
           CRAFT runs on them (B-LoRA crops its two blocks out of them; K-LoRA adds the non-attention part).
  [attn]   attention projections only: what K-LoRA (official code: nothing outside attention, non_attention=
           "ignore"), ZipLoRA, NP-LoRA and SSR-Merge use (SDXL DreamBooth LoRAs on the attention layers; SSR's
           official hooks route nn.Linear layers only).
  [blora]  one LoRA on B-LoRA's two blocks, trained jointly (the paper's training; preset "blora").
  [craft]  CRAFT's disjoint-layer pair, with CRAFT's own ablations (smooth / constant schedule, symmetric CFG).
Which inputs and options a method's paper prescribes is declared on the method (`FusionMethod.paper_inputs`); Switch
and Composite also run as their official code does (`switch official [locon]`: τ + 1 first segment, scale 0.8).
`direct [inputs]` is direct merging of the same LoRAs; every other row's difference to it is paired on (pair, seed):
per pair the mean over seeds of (method − direct), then a Student t-interval over pairs (`eval.paired`; the paired
bootstrap over pairs is in the JSON). Same prompt template and noise seeds for every row and pair.

Full run (the README's table; 20 pairs x 4 seeds; the per-pair results and LoRAs are cached, so an interrupted run
resumes where it stopped):
    python -m benchmarks.fusion_leaderboard --pairs 20 --seeds 4
Smoke run (checks, not figures; writes fusion_leaderboard_smoke.json):
    python -m benchmarks.fusion_leaderboard --pairs 2 --seeds 1 --content-epochs 2 --style-epochs 4

LoRAs and per-pair results are cached under --work (default out/leaderboard, not in git): a rerun with the
same settings only redoes what is missing; `--done-only` reports on the pairs done so far without computing any.
`--num-processes N` trains the missing LoRAs N at a time in worker processes, then splits the pairs to do between
N processes started by `accelerate launch` (`split_between_processes`); each writes its pairs' result files and the
main process reports on all of them. A pair is one result file, written when the pair is complete, so a killed
process's unfinished pairs are redone on resume and no pair counts twice. Writes WORK/report.html, WORK/paired_differences.png and the per-pair
JSON files WORK/pairs/<pair>/result.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

from benchmarks.common import RESULTS, print_table, write_result
from lorafuse.errors import UserInputError
from lorafuse.eval.html import HtmlReport
from lorafuse.eval.paired import forest_plot, paired_difference
from lorafuse.eval.report import FILES, group_stats
from lorafuse.eval.world_compare import (
    INPUT_RECIPES,
    LOCON,
    SCORES,
    Run,
    compare_pair,
    input_sets_of,
    paper_runs,
    scores_bar_chart,
    side_by_side,
    summary,
    train_pair_loras,
)
from lorafuse.utils.atomic import atomic_write_bytes, atomic_write_text
from lorafuse.world.catalog import CLASS_NAMES, HELD_OUT_STYLES, INDIVIDUALS_PER_CLASS, SEEN_INDIVIDUALS

STARTED = "LORAFUSE_LEADERBOARD_STARTED"  # environment: the run's start (time.time()), for launched processes
FULL = {"pairs": 20, "seeds": 4}  # the bar; fewer is a smoke run
PAIRED_METRICS = ("oracle_content", "oracle_style", "oracle_hmean")
README_METRICS = ("oracle_content", "oracle_style", "oracle_hmean", "right_individual", "right_style", "oracle_ci")
# The paper's ablations, each a row on the method's paper inputs (the claim checked: the full method beats each one)
ABLATIONS = {
    "craft": (("smooth", {"schedule": "smooth"}), ("constant", {"schedule": "constant"}),
              ("symmetric", {"symmetric": True})),
}  # fmt: skip


def label(name: str, inputs: str) -> str:
    return f"{name} [{inputs}]"


def leaderboard_runs(methods: list[str]) -> list[Run]:
    """`compare_pair` runs: direct merging on every input set used (the paired baseline of every row), every
    method on the LoCon pair (a method that needs its own inputs, CRAFT, does not), each method on its paper's
    inputs and options (`FusionMethod.paper_inputs`) and the paper's ablations."""
    from lorafuse.fusion.registry import get_method

    rows: list[Run] = [(label(m, LOCON), "fused", m, LOCON, {}) for m in methods
                       if get_method(m).lora_layers == LOCON]  # fmt: skip
    common = {(r[2], r[3]) for r in rows}
    rows += [r for r in paper_runs(methods) if (r[2], r[3]) not in common or r[4]]
    for m in methods:
        inputs, options = get_method(m).paper_inputs
        rows += [(label(f"{m} {name}", inputs), "fused", m, inputs, {**options, **change})
                 for name, change in ABLATIONS.get(m, ())]  # fmt: skip
    baselines = [(label("direct", inputs), "fused", "direct", inputs, {}) for inputs in input_sets_of(rows)]
    return baselines + [r for r in rows if r[0] not in {b[0] for b in baselines}]


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


def recipe_settings(args) -> dict[str, dict]:
    """The recipe overrides of the command line (smoke runs), for content and style."""
    settings: dict[str, dict] = {"content": {}, "style": {}}
    if args.content_epochs:
        settings["content"]["epochs"] = args.content_epochs
    if args.style_epochs:
        settings["style"]["epochs"] = args.style_epochs
    return settings


def pair_recipes(individual: str, style: str, args, methods: list[str]) -> dict[str, tuple]:
    """input set -> (content recipe, style recipe) of every LoRA a pair's rows fuse."""
    from lorafuse.train.world_personalize import style_recipe, subject_recipe

    settings = recipe_settings(args)
    return {inputs: (subject_recipe(individual, **{**settings["content"], **INPUT_RECIPES[inputs]}),
                     style_recipe(style, **{**settings["style"], **INPUT_RECIPES[inputs]}))
            for inputs in input_sets_of(leaderboard_runs(methods))}  # fmt: skip


def run_pair(pipe, oracle, individual: str, style: str, args, methods: list[str], work: Path,
             done_only: bool = False) -> dict | None:  # fmt: skip
    """The rows of one pair, from WORK/pairs/<pair>/result.json when it was made with these settings; with
    `done_only` None when it was not (nothing is trained or sampled)."""
    from lorafuse.train.world_personalize import base_fingerprint
    from lorafuse.world.oracle import default_oracle_path

    settings = recipe_settings(args)
    runs = leaderboard_runs(methods)
    input_sets = input_sets_of(runs)
    # a cached result is reused only when the same LoRAs (recipe keys hash the base's weights too) are judged by
    # the same oracle weights with the same rows and sampling settings
    lora_keys = {inputs: [r.key() for r in pair] for inputs, pair in pair_recipes(individual, style, args, methods).items()}
    key = {"runs": runs, "seeds": args.seeds, "seed": args.seed, "steps": args.steps, "guidance": args.guidance,
           "recipes": settings, "lora_keys": lora_keys, "base": base_fingerprint("world"),
           "oracle": base_fingerprint(str(default_oracle_path()))}  # fmt: skip
    signature = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = work / "pairs" / f"{individual}+{style}"
    cached = folder / "result.json"
    if cached.is_file():
        done = json.loads(cached.read_text())
        if done.get("signature") == signature:
            return done
    if done_only:
        return None
    t0, c0 = time.perf_counter(), time.process_time()
    loras = train_pair_loras(individual, style, work, methods=methods, content_settings=settings["content"],
                             style_settings=settings["style"], progress=not args.no_progress,
                             input_sets=input_sets)  # fmt: skip
    t1, c1 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CRAFT and B-LoRA use part of each LoRA by design; they say so each time
        result = compare_pair(pipe, loras, oracle=oracle, methods=methods, seeds=args.seeds, seed=args.seed,
                              steps=args.steps, guidance=args.guidance, progress=not args.no_progress,
                              runs=runs)  # fmt: skip
    from lorafuse.utils.images import save_image

    save_image(side_by_side(result, title=f"{result.pair}: {result.prompt}"), folder / "side_by_side.png")
    done = {"signature": signature, "pair": result.pair, "prompt": result.prompt, "seeds": result.seeds,
            "skipped": result.skipped, "rows": result.rows,
            "seconds": {"train": round(t1 - t0, 1), "compare": round(time.perf_counter() - t1, 1)},
            # this process's CPU time (one thread): what the pair costs on an idle core, whatever else runs
            "cpu_seconds": {"train": round(c1 - c0, 1), "compare": round(time.process_time() - c1, 1)}}  # fmt: skip
    atomic_write_text(cached, json.dumps(done, indent=1))
    return done


def figures_of(rows: list[dict], metrics=SCORES) -> dict:
    out: dict[str, dict] = {}
    for metric in metrics:
        for (method,), iv in group_stats(rows, ["method"], metric).items():
            out.setdefault(method, {})[metric] = {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n}
    return out


def paired_figures(rows: list[dict]) -> list:
    """Every fused row's paired difference to direct merging of the same inputs, per metric (t and bootstrap)."""
    fused = list(dict.fromkeys((r["method"], r["inputs"]) for r in rows if r["kind"] == "fused"))
    out = []
    for name, inputs in fused:
        baseline = label("direct", inputs)
        if name == baseline:
            continue
        for metric in PAIRED_METRICS:
            for interval in ("t", "bootstrap"):
                out.append(paired_difference(rows, name, baseline, metric, interval=interval))
    return out


def ablation_figures(rows: list[dict], methods: list[str]) -> list:
    """Each paper's full method against each of its ablations on the same inputs (full − ablation, so > 0 is the
    paper's claim that the full method wins), per metric, t-interval then bootstrap."""
    present = {r["method"] for r in rows}
    out = []
    for full, _, m, inputs, _ in paper_runs(methods):
        for name, _ in ABLATIONS.get(m, ()):
            ablation = label(f"{m} {name}", inputs)
            if full not in present or ablation not in present:
                continue
            for metric in PAIRED_METRICS:
                for interval in ("t", "bootstrap"):
                    out.append(paired_difference(rows, full, ablation, metric, interval=interval))
    return out


def markdown_table(figures: dict, paired: list, rows: list[dict], command: str) -> str:
    """The README's table: per row its inputs, mean [95 % interval] of the scores, the paired differences to
    direct on the same inputs (t-interval over pairs), then seconds per image."""

    def cell(d: dict | None) -> str:
        if not d:
            return ""
        return f"{d['mean']:.3f}" if d["n"] < 2 else f"{d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"

    by = {(d.method, d.metric): d for d in paired if d.interval == "t"}
    inputs = {r["method"]: r.get("inputs", "") for r in rows}
    names = ["content", "style", "hmean"]
    lines = [f"| row | inputs | {' | '.join(README_METRICS)} | {' | '.join(f'Δ{n} vs direct' for n in names)} "
             "| s / image |", "|" + " --- |" * (len(README_METRICS) + len(names) + 3)]  # fmt: skip
    for method, f in figures.items():
        if method == "skipped":
            continue
        spi = f.get("seconds_per_image", {}).get("mean")
        deltas = [str(by[(method, m)]) if (method, m) in by and by[(method, m)].n >= 2 else ""
                  for m in PAIRED_METRICS]  # fmt: skip
        lines.append(f"| {method} | {inputs.get(method, '')} | {' | '.join(cell(f.get(m)) for m in README_METRICS)} "
                     f"| {' | '.join(deltas)} | {'' if spi is None else f'{spi:.2f}'} |")  # fmt: skip
    return "\n".join(lines) + f"\n\n`{command}`"


def write_html(work: Path, done: list[dict], rows: list[dict], paired: list, args, elapsed: float,
               ablations: list = ()) -> Path:  # fmt: skip
    folder = work / FILES
    report = HtmlReport(f"lorafuse fusion leaderboard: {len(done)} pairs x {args.seeds} seed(s)")
    report.paragraph(f"Every method on held-out individual x style pairs of the built-in world, {args.steps} DDIM "
                     f"steps, guidance {args.guidance}, noise seeds {args.seed}..{args.seed + args.seeds - 1} for "
                     f"every row. Rows are 'method [inputs]': locon = the all-layer LoCon LoRAs users have; attn, "
                     f"blora, craft = the inputs a paper prescribes. {elapsed:.0f} s.")  # fmt: skip
    report.heading("Paired differences to direct merging of the same LoRAs")
    if paired:  # none when direct merging is the only method
        forest_plot([d for d in paired if d.interval == "t"], work / "paired_differences.png",
                    title="method − direct [same inputs], mean over pairs, 95 % t-interval over pairs")  # fmt: skip
        report.image("paired_differences.png", "green: better than direct, red: worse, grey: no difference shown")
    report.table(["row", "metric", "t-interval", "bootstrap", "pairs", "verdict"],
                 [[d.method, d.metric, str(d), str(b), d.n, d.verdict]
                  for d, b in zip(paired[::2], paired[1::2], strict=True)])  # fmt: skip
    if ablations:
        report.heading("Full method − its ablations (same LoRAs; > 0: the full method wins)")
        report.table(["full", "ablation", "metric", "t-interval", "bootstrap", "pairs", "verdict"],
                     [[d.method, d.baseline, d.metric, str(d), str(b), d.n, d.verdict]
                      for d, b in zip(ablations[::2], ablations[1::2], strict=True)])  # fmt: skip
    header, table = summary(rows)
    report.heading("Scores per row")
    report.table(header, table)
    scores_bar_chart(rows, folder / "scores.png", title="oracle scores, all pairs (mean, 95 % interval)")
    report.image(f"{FILES}/scores.png", "content and style similarity and their harmonic mean")
    report.heading("Pictures")
    for d in done:
        report.image(f"pairs/{d['pair']}/side_by_side.png", d["pair"])
        for name, reason in d["skipped"].items():
            report.paragraph(f"{d['pair']}: skipped {name}: {reason}")
    return report.write(work / "report.html")


def missing_recipes(pairs: list[tuple[str, str]], args, methods: list[str]) -> list:
    """The recipes of the LoRAs `pairs` need that are not trained under WORK yet, each once (a style LoRA serves
    several pairs)."""
    from lorafuse.train.world_personalize import recipe_paths

    recipes = {r.key(): r for p in pairs for pair in pair_recipes(*p, args, methods).values() for r in pair}
    return [r for r in recipes.values() if not (recipe_paths(r, args.work)[1] / f"{r.stem}.safetensors").exists()]


def _train(recipe, work: Path) -> None:
    from lorafuse.train.world_personalize import train_world_lora

    train_world_lora(recipe, work, progress=False)


def train_missing(pairs: list[tuple[str, str]], args, methods: list[str], processes: int) -> int:
    """Train the missing LoRAs of `pairs`, `processes` at a time in plain worker processes, before the pairs are
    split between launched processes: a trainer inside an accelerate-launched process would join their DDP group
    (and two processes must not train the same recipe into one folder). Returns how many were trained."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    missing = missing_recipes(pairs, args, methods)
    if missing:
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_train, missing, [args.work] * len(missing)))
    return len(missing)


def _words_without_processes(words: list[str]) -> list[str]:
    """The command line for the launched processes: the same words without --num-processes (they must not
    launch again)."""
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w == "--num-processes":
            skip = True
        elif not w.startswith("--num-processes="):
            out.append(w)
    return out


def main() -> None:
    from lorafuse.fusion.api import load_base
    from lorafuse.fusion.registry import get_method, method_names
    from lorafuse.world.oracle import default_oracle

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=FULL["pairs"], help="held-out (individual, style) pairs")
    ap.add_argument("--seeds", type=int, default=FULL["seeds"], help="noise seeds per pair and row")
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
    ap.add_argument("--num-processes", type=int, default=1, metavar="N",
                    help="split the LoRAs to train, then the pairs, between N processes (`accelerate launch`; CPUs "
                         "or GPUs); the main process reports")  # fmt: skip
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON and the plot")
    ap.add_argument("--done-only", action="store_true",
                    help="report on the pairs already done under --work with these settings; train and sample nothing "
                         "(e.g. while a run is going, or after one was stopped)")  # fmt: skip
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else method_names()
    for m in methods:
        get_method(m)  # unknown names fail before any training
    if args.seeds < 1 or args.steps < 1:
        raise UserInputError(f"--seeds and --steps must be at least 1, got {args.seeds} and {args.steps}")
    pairs = held_out_pairs(args.pairs)

    if args.num_processes < 1:
        raise UserInputError(f"--num-processes {args.num_processes}: give 1 or more")
    from lorafuse.utils.launch import in_launched_process, process_state, relaunch

    def undone() -> list[tuple[str, str]]:
        return [p for p in pairs if run_pair(None, None, *p, args, methods, args.work, done_only=True) is None]

    # wall clock of the whole run; launched processes take the launcher's start, so the LoRAs it trained count
    started = float(os.environ.setdefault(STARTED, str(time.time())))
    if args.num_processes > 1 and not in_launched_process():
        if not args.done_only:
            print(f"trained {train_missing(undone(), args, methods, args.num_processes)} LoRA(s)", flush=True)
        words = _words_without_processes(sys.argv[1:])
        sys.exit(relaunch(args.num_processes, words, module="benchmarks.fusion_leaderboard"))

    state = process_state()
    todo = [] if args.done_only else undone()
    computed = len(todo)
    if state is not None:
        if missing_recipes(todo, args, methods):  # every process sees the same: all stop here
            raise UserInputError("LoRAs are missing under --work: start the run with --num-processes N (it trains "
                                 "them before launching), not with accelerate launch directly")  # fmt: skip
        state.wait_for_everyone()  # every process has read the same done pairs before any process writes one
        with state.split_between_processes(todo) as share:
            todo = list(share)
    if todo:
        pipe, oracle = load_base("world"), default_oracle()
    for k, (ind, sty) in enumerate(todo):
        run_pair(pipe, oracle, ind, sty, args, methods, args.work)
        spent = time.time() - started
        print(f"[{k + 1}/{len(todo)}] {ind}+{sty}: {spent / 60:.1f} min so far, "
              f"~{spent / (k + 1) * (len(todo) - k - 1) / 60:.0f} min to go", flush=True)  # fmt: skip
    if state is not None:
        state.wait_for_everyone()  # the main process reports on every process's pairs, read back from WORK
        if not state.is_main_process:
            return
    done = [d for p in pairs if (d := run_pair(None, None, *p, args, methods, args.work, done_only=True))]
    if not done:
        raise UserInputError(f"{args.work}: no pair is done with these settings yet; run without --done-only")
    print(f"{len(done)} of {len(pairs)} pairs done ({computed} computed now, {len(done) - computed} already done)")
    elapsed = time.time() - started
    rows = [r for d in done for r in d["rows"]]

    header, table = summary(rows)
    print(f"\n{len(done)} of {len(pairs)} pairs x {args.seeds} seed(s), {args.steps} steps, guidance {args.guidance}")
    print_table(header, table)
    paired = paired_figures(rows)
    print("\npaired differences to direct merging of the same LoRAs (mean over pairs, 95 % t-interval over pairs)")
    print_table(["row", "metric", "difference", "pairs", "verdict"],
                [[d.method, d.metric, str(d), d.n, d.verdict] for d in paired if d.interval == "t"])  # fmt: skip
    ablations = ablation_figures(rows, methods)
    print("\nfull method − its ablation, same LoRAs (mean over pairs, 95 % t-interval over pairs; > 0: full wins)")
    print_table(["full", "ablation", "metric", "difference", "pairs", "verdict"],
                [[d.method, d.baseline, d.metric, str(d), d.n, d.verdict] for d in ablations if d.interval == "t"])  # fmt: skip
    figures = figures_of(rows)
    smoke = args.pairs < FULL["pairs"] or args.seeds < FULL["seeds"] or bool(args.content_epochs or args.style_epochs)
    name = "fusion_leaderboard_smoke" if smoke else "fusion_leaderboard" if len(done) == len(pairs) else \
        "fusion_leaderboard_partial"  # fmt: skip
    command = " ".join(["python -m benchmarks.fusion_leaderboard", *sys.argv[1:]])  # as run, every flag
    print("\n" + markdown_table(figures, paired, rows, command) + "\n")
    page = write_html(args.work, done, rows, paired, args, elapsed, ablations)
    print(f"report: {page}")
    # the plot beside the JSON (committed; WORK is not)
    if paired:
        atomic_write_bytes(args.results / f"{name}_paired.png", (args.work / "paired_differences.png").read_bytes())
    config = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "methods": methods,
              "pairs_used": [d["pair"] for d in done], "pairs_asked": len(pairs), "smoke": smoke,
              # this invocation's wall time (--done-only: only the reporting), and the pairs' own, summed
              "seconds": round(elapsed, 1), "done_only": args.done_only,
              "pair_seconds": round(sum(sum(d.get("seconds", {}).values()) for d in done), 1),
              "cpu_seconds": round(sum(sum(d.get("cpu_seconds", {}).values()) for d in done), 1),
              "input_recipes": INPUT_RECIPES,
              "seconds_per_pair": {d["pair"]: d.get("seconds") for d in done},
              "cpu_seconds_per_pair": {d["pair"]: d.get("cpu_seconds") for d in done}}  # fmt: skip
    figures["skipped"] = {d["pair"]: d["skipped"] for d in done if d["skipped"]}
    figures["paired"] = [d.to_json() for d in paired]
    figures["ablations"] = [d.to_json() for d in ablations]
    write_result(name, config, figures, folder=args.results)


if __name__ == "__main__":
    main()
