"""Does the CRAFT expert encoder, trained on the world's λ grid, pick good (λ_c, λ_s) for span texts it never saw?

For each (individual, style) LoRA pair: CRAFT fusion over the λ grid, scored by the oracle (seed-mean harmonic
mean of content and style similarity), on the "train" span wordings -> best-λ examples -> `train_expert`. Then the
paper's semantic extension (seed 001 App. B.3) on wordings the encoder never saw (`expert_world.world_spans`):
type I new content span, II new style span, III both. For every test prompt the grid is run too (its grid-best
λ), and four λ choices are re-scored on FRESH seeds (the grid-best's own score is the max of 25 noisy estimates,
biased upward): default (1, 1) (the markers), constant (the mean of the training labels, a no-text baseline),
predicted (the encoder), grid-best.

    python -m benchmarks.craft_expert [--pairs teapot_08:crayon,mug_09:blueprint] [--seeds 2] [--steps 15]
    python -m benchmarks.craft_expert --smoke        # 1 pair, 3x3 grid, 1 seed, 6 steps, few prompts

Writes benchmarks/results/craft_expert.json and craft_expert.png (λ predicted vs grid-best; fresh-seed scores).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from benchmarks.common import RESULTS, print_table, write_result
from lorafuse.eval.metrics import OracleScorer, confidence_interval
from lorafuse.fusion.craft.expert import pipeline_text_embedder, train_expert
from lorafuse.fusion.craft.expert_data import DEFAULT_POINT, lambda_grid
from lorafuse.fusion.craft.expert_world import (
    EXTENSION_TYPES,
    craft_oracle_scores,
    parse_pair,
    span_prompts,
    world_grid_search,
)
from lorafuse.lora.io import load_lora
from lorafuse.models.load import load_base_pipeline
from lorafuse.world.oracle import default_oracle
from lorafuse.world.personalize import style_recipe, subject_recipe, train_world_lora

CHOICES = ("default", "constant", "predicted", "grid_best")
FRESH_SEED = 1000  # fresh-seed re-scoring starts here: never one of the grid's seeds


def args_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="teapot_08:crayon,mug_09:blueprint")
    ap.add_argument("--grid", default="0,0.25,0.5,0.75,1", help="λ values (both axes)")
    ap.add_argument("--seeds", type=int, default=2, help="noises per prompt and λ on the grid")
    ap.add_argument("--fresh-seeds", type=int, default=2, help="noises per prompt for the fresh re-scoring")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--expert-steps", type=int, default=500)
    ap.add_argument("--max-prompts", type=int, default=0, help="cap per wording set and pair (0: all)")
    ap.add_argument(
        "--work-dir", default="out/craft_bench", help="where the world LoRAs are trained / reused"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--smoke", action="store_true", help="1 pair, 3x3 grid, 1 seed, 6 steps, 2 prompts per set"
    )
    return ap


def main() -> None:
    args = args_parser().parse_args()
    if args.smoke:
        args.pairs, args.grid, args.seeds, args.fresh_seeds = "teapot_08:crayon", "0,0.5,1", 1, 1
        args.steps, args.max_prompts, args.expert_steps = 6, 2, 200
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    pairs = [parse_pair(p) for p in args.pairs.split(",")]
    values = [float(v) for v in args.grid.split(",")]
    grid = lambda_grid(values)
    settings = {"seeds": args.seeds, "steps": args.steps, "guidance": args.guidance}
    t0 = time.perf_counter()

    pipe, oracle = load_base_pipeline("world"), default_oracle()
    embed = pipeline_text_embedder(pipe)
    ids: dict[str, int] = {}
    train_searches, tests = [], []  # tests: (pair index, type, GridSearch)
    loras = []
    for k, (ind, sty) in enumerate(pairs):
        cid = ids.setdefault(ind, len(ids) + 1)
        c = load_lora(train_world_lora(subject_recipe(ind, layers="craft"), args.work_dir), base=pipe)
        s = load_lora(train_world_lora(style_recipe(sty, layers="craft"), args.work_dir), base=pipe)
        loras.append((c, s))

        def search(prompts, ind=ind, sty=sty, c=c, s=s):
            prompts = prompts[: args.max_prompts] if args.max_prompts else prompts
            return world_grid_search(pipe, c, s, ind, sty, prompts, oracle=oracle, grid=grid, **settings)

        train_searches.append(search(span_prompts(ind, sty, cid, "train", "train")))
        for kind, (cw, sw) in EXTENSION_TYPES.items():
            tests.append((k, kind, search(span_prompts(ind, sty, cid, cw, sw))))
        print(f"{ind} x {sty}: grid done ({time.perf_counter() - t0:.0f} s)", flush=True)

    examples = [e for s in train_searches for e in s.examples()]
    expert = train_expert(examples, embed, steps=args.expert_steps)
    constant = (
        float(np.mean([e.lambda_c for e in examples])),
        float(np.mean([e.lambda_s for e in examples])),
    )

    # re-score every test prompt at the four λ choices on fresh seeds
    rows: list[dict] = []
    for k, kind, search in tests:
        ind, sty = pairs[k]
        scorer = OracleScorer(oracle, individual=ind, style=sty)
        best = search.best()
        for p, gb in zip(search.prompts, best, strict=True):
            pred = expert.predict(embed, p.concept_id, p.content_span, p.style_span)
            row = {"pair": f"{ind}:{sty}", "type": kind, "content_span": p.content_span, "style_span": p.style_span,
                   "grid_best": list(gb), "predicted": list(pred), "constant": list(constant),
                   "default": list(DEFAULT_POINT)}  # fmt: skip
            for choice in CHOICES:
                lc, ls = row[choice]
                out = craft_oracle_scores(pipe, *loras[k], [p.clean], scorer, lambda_c=lc, lambda_s=ls,
                                          seeds=args.fresh_seeds, seed=FRESH_SEED, steps=args.steps,
                                          guidance=args.guidance)  # fmt: skip
                row[f"score_{choice}"] = float(out["harmonic"].mean())
            rows.append(row)

    figures = summarise(rows, train_searches, examples, constant)
    figures["seconds"] = time.perf_counter() - t0
    figures["train_grid"] = [s.to_json() for s in train_searches]
    figures["test_rows"] = rows
    name = "craft_expert" + ("_smoke" if args.smoke else "")
    plot(rows, figures, name)
    write_result(name, vars(args), figures)


def summarise(rows: list[dict], train_searches, examples, constant) -> dict:
    figures: dict = {"train_examples": len(examples), "constant_lambda": list(constant), "per_type": {}}
    spread = np.concatenate([s.scores.max(1) - s.scores.min(1) for s in train_searches])
    figures["train_grid_spread"] = str(confidence_interval(spread))  # how much λ matters at all, per prompt
    table = []
    for kind in [*EXTENSION_TYPES, "all"]:
        sel = [r for r in rows if kind == "all" or r["type"] == kind]
        if not sel:
            continue
        gb = np.array([r["grid_best"] for r in sel])
        entry = {"n": len(sel)}
        for choice in ("predicted", "constant"):
            entry[f"mae_{choice}"] = float(np.abs(np.array([r[choice] for r in sel]) - gb).mean())
        for choice in CHOICES:
            ci = confidence_interval([r[f"score_{choice}"] for r in sel])
            entry[f"score_{choice}"] = {"mean": ci.mean, "low": ci.low, "high": ci.high}
        entry["predicted_minus_default"] = str(
            confidence_interval([r["score_predicted"] - r["score_default"] for r in sel])
        )
        figures["per_type"][kind] = entry
        table.append([kind, len(sel), entry["mae_predicted"], entry["mae_constant"],
                      *[entry[f"score_{c}"]["mean"] for c in CHOICES], entry["predicted_minus_default"]])  # fmt: skip
    print_table(["type", "n", "MAE pred", "MAE const", *[f"score {c}" for c in CHOICES], "pred - default [95% CI]"],
                table)  # fmt: skip
    return figures


def plot(rows: list[dict], figures: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    from lorafuse.utils.atomic import atomic_path

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    colours = {"I": "tab:blue", "II": "tab:orange", "III": "tab:green"}
    rng = np.random.default_rng(0)
    for ax, j, symbol in ((axes[0], 0, "λ_c"), (axes[1], 1, "λ_s")):
        for kind, colour in colours.items():
            sel = [r for r in rows if r["type"] == kind]
            x = np.array([r["grid_best"][j] for r in sel]) + rng.uniform(
                -0.02, 0.02, len(sel)
            )  # jitter: grid ties
            ax.scatter(x, [r["predicted"][j] for r in sel], c=colour, label=f"type {kind}", s=18)
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set(xlabel=f"grid-best {symbol}", ylabel=f"predicted {symbol}", title=f"{symbol}: unseen span texts")
        ax.legend(fontsize=8)
    kinds = [k for k in figures["per_type"] if k != "all"]
    width = 0.2
    for i, choice in enumerate(CHOICES):
        e = [figures["per_type"][k][f"score_{choice}"] for k in kinds]
        means = np.array([v["mean"] for v in e])
        err = np.array([[v["mean"] - v["low"] for v in e], [v["high"] - v["mean"] for v in e]])
        axes[2].bar(
            np.arange(len(kinds)) + (i - 1.5) * width, means, width, yerr=np.nan_to_num(err), label=choice
        )
    axes[2].set(xticks=range(len(kinds)), xticklabels=[f"type {k}" for k in kinds], ylabel="oracle harmonic score",
                title="fresh-seed score by λ choice (95% CI)")  # fmt: skip
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
