"""Does the CRAFT expert encoder, trained on the world's λ grid, pick good (λ_c, λ_s) for span texts it never saw?

The spans differ in what they ask for (`expert_world` docstring): the LoRAs' own subject / style, or another class /
a style the base model already knows, so the right λ depends on the wording. Per (individual, style) LoRA pair:

1. λ grid on the "train" wordings, each prompt scored by the oracle against what it asks for (seed-mean harmonic
   mean of content and style similarity) -> soft labels (score-weighted mean λ, `expert_data`) -> `train_expert`.
2. The paper's semantic extension (the CRAFT-LoRA paper, App. B.3) on wordings the encoder never saw: type I new content span,
   II new style span, III both. The grid is run on them too: their labels give the λ error, their argmax the
   "grid-best" choice.
3. Four λ choices re-scored on FRESH seeds (a grid argmax is the max of 9 noisy estimates, biased upward on its own
   seeds): default (1, 1) (the markers), constant (the mean training label: no text), predicted (the encoder),
   grid-best. Differences are paired per prompt (same fresh noises for every choice), 95 % Student-t intervals.

    python -m benchmarks.craft_expert --threads 1          # 3 pairs, 3x3 grid, 2 seeds, 12 steps (~30 min, 1 core)
    python -m benchmarks.craft_expert --smoke              # 1 pair, few prompts, 6 steps

Writes benchmarks/results/craft_expert.json and craft_expert.png (λ predicted vs label; fresh-seed scores).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from benchmarks.common import RESULTS, print_table, write_result
from lorafuse.eval.expert_world import (
    EXTENSION_TYPES,
    WorldJudge,
    craft_images,
    parse_pair,
    world_grid_search,
    world_prompts,
)
from lorafuse.eval.metrics import confidence_interval
from lorafuse.fusion.craft.expert import pipeline_text_embedder, train_expert
from lorafuse.fusion.craft.expert_data import DEFAULT_POINT, lambda_grid
from lorafuse.lora.io import load_lora
from lorafuse.models.load import load_base_pipeline
from lorafuse.train.world_personalize import style_recipe, subject_recipe, train_world_lora
from lorafuse.world.oracle import default_oracle

CHOICES = ("default", "constant", "predicted", "grid_best")
FILLER = {"in", "a", "style", "sks"}  # template words and the trigger: not what names a style
FRESH_SEED = 1000  # fresh-seed re-scoring starts here: never one of the grid's seeds (0, 1, ...)


def args_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="teapot_08:crayon,mug_09:blueprint,robot_09:mosaic")
    ap.add_argument("--grid", default="0,0.5,1", help="λ values (both axes)")
    ap.add_argument("--seeds", type=int, default=2, help="noises per prompt and λ on the grid")
    ap.add_argument("--fresh-seeds", type=int, default=2, help="noises per prompt for the fresh re-scoring")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--temperature", type=float, default=0.05, help="soft-label τ (0: argmax labels)")
    ap.add_argument("--per-style", type=int, default=2, help="training prompts per style wording and pair")
    ap.add_argument("--type1-limit", type=int, default=7, help="type-I test prompts per pair (0: all 13)")
    ap.add_argument("--expert-steps", type=int, default=500)
    ap.add_argument(
        "--work-dir", default="out/craft_bench", help="where the world LoRAs are trained / reused"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="1 pair, 1 seed, 6 steps, 3 test prompts per type")
    return ap


def main() -> None:
    args = args_parser().parse_args()
    if args.smoke:
        args.pairs, args.seeds, args.fresh_seeds, args.steps = "teapot_08:crayon", 1, 1, 6
        args.per_style, args.expert_steps = 1, 200
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    pairs = [parse_pair(p) for p in args.pairs.split(",")]
    grid = lambda_grid([float(v) for v in args.grid.split(",")])
    settings = {"steps": args.steps, "guidance": args.guidance}
    t0 = time.perf_counter()

    pipe, judge = load_base_pipeline("world"), WorldJudge(default_oracle())
    embed = pipeline_text_embedder(pipe)
    ids: dict[str, int] = {}
    train_searches, tests, loras = [], [], []  # tests: (pair index, type, prompt, test label, grid-best)
    for ind, sty in pairs:  # every LoRA first: the recipe key hashes the base folder, which may change later
        c = load_lora(train_world_lora(subject_recipe(ind, layers="craft"), args.work_dir), base=pipe)
        s = load_lora(train_world_lora(style_recipe(sty, layers="craft"), args.work_dir), base=pipe)
        loras.append((c, s))
    for k, (ind, sty) in enumerate(pairs):
        cid, (c, s) = ids.setdefault(ind, len(ids) + 1), loras[k]
        train = world_prompts(ind, sty, cid, "train", "train", per_style=args.per_style, offset=k)
        typed = []
        for kind, (cw, sw) in EXTENSION_TYPES.items():
            limit = args.type1_limit if kind == "I" else 0
            limit = 3 if args.smoke else limit
            typed += [(kind, p) for p in world_prompts(ind, sty, cid, cw, sw, offset=k, limit=limit)]
        search_kw = {"judge": judge, "grid": grid, "temperature": args.temperature, "seeds": args.seeds}
        train_searches.append(world_grid_search(pipe, c, s, train, **search_kw, **settings))
        test = world_grid_search(pipe, c, s, [p for _, p in typed], **search_kw, **settings)  # one batch
        for (kind, p), label, best in zip(typed, test.labels(), test.best(), strict=True):
            tests.append((k, kind, p, label, best))
        print(f"{ind} x {sty}: grids done ({time.perf_counter() - t0:.0f} s)", flush=True)

    examples = [e for s in train_searches for e in s.examples()]
    expert = train_expert(examples, embed, steps=args.expert_steps)
    constant = (
        float(np.mean([e.lambda_c for e in examples])),
        float(np.mean([e.lambda_s for e in examples])),
    )
    train_fit = np.mean(
        [np.abs(np.subtract(expert.predict(embed, e.concept_id, e.content_span, e.style_span),
                            (e.lambda_c, e.lambda_s))) for e in examples], axis=0)  # fmt: skip
    cv = style_cross_validation(examples, embed, args.expert_steps)

    rows: list[dict] = []
    for k, kind, p, label, best in tests:
        pred = expert.predict(embed, p.concept_id, p.content_span, p.style_span)
        rows.append({"pair": ":".join(pairs[k]), "pair_index": k, "type": kind, "content_span": p.content_span,
                     "style_span": p.style_span, "content_kind": p.content_kind, "style_kind": p.style_kind,
                     "label": list(label), "grid_best": list(best), "predicted": list(pred),
                     "constant": list(constant), "default": list(DEFAULT_POINT)})  # fmt: skip
    fresh_scores(rows, tests, loras, pipe, judge, args, settings)

    train_words = {w for e in examples for w in e.style_span.split()} - FILLER
    for r in rows:  # does the style span name its style with words some training span used?
        r["style_words"] = "seen" if set(r["style_span"].split()) - FILLER <= train_words else "new"
    figures = summarise(rows, train_searches, examples, constant, train_fit)
    figures["style_cross_validation"] = cv
    figures["seconds"] = time.perf_counter() - t0
    figures["train_grid"] = [s.to_json() for s in train_searches]
    figures["test_rows"] = rows
    name = "craft_expert" + ("_smoke" if args.smoke else "")
    plot(rows, figures, name)
    write_result(name, vars(args), figures)


def fresh_scores(rows, tests, loras, pipe, judge, args, settings) -> None:
    """row["score_<choice>"]: seed-mean harmonic score on fresh seeds. Prompts that share a pair and a λ are
    sampled in one batch; image k of every prompt starts from noise FRESH_SEED + k whatever the batch."""
    for k in range(len(loras)):
        idx = [i for i, t in enumerate(tests) if t[0] == k]
        for choice in CHOICES:
            groups: dict[tuple[float, float], list[int]] = {}
            for i in idx:
                groups.setdefault(tuple(rows[i][choice]), []).append(i)
            for (lc, ls), members in groups.items():
                prompts = [tests[i][2] for i in members]
                images = craft_images(pipe, *loras[k], [p.clean for p in prompts], lambda_c=lc, lambda_s=ls,
                                      seeds=args.fresh_seeds, seed=FRESH_SEED, **settings)  # fmt: skip
                out = judge(images, prompts, args.fresh_seeds)
                for i, h, c, s in zip(members, out["harmonic"], out["content"], out["style"], strict=True):
                    rows[i][f"score_{choice}"] = float(h.mean())
                    rows[i][f"content_{choice}"], rows[i][f"style_{choice}"] = (
                        float(c.mean()),
                        float(s.mean()),
                    )


def style_cross_validation(examples, embed, steps: int) -> dict:
    """λ_s error on a style name the encoder never saw, from the training labels alone (no sampling): leave out
    every training prompt whose style span names one seen style ("hatched ink", ...), train on the rest, predict
    the left-out ones; the constant (mean label of the same rest) is the no-text reference."""

    def named(e):
        return " ".join(w for w in e.style_span.split() if w not in FILLER)

    folds = sorted({named(e) for e in examples if "sks" not in e.style_span.split()})
    pred, const = [], []
    for fold in folds:
        rest = [e for e in examples if named(e) != fold or "sks" in e.style_span.split()]
        out = [e for e in examples if e not in rest]
        model, mean = train_expert(rest, embed, steps=steps), float(np.mean([e.lambda_s for e in rest]))
        pred += [
            abs(model.predict(embed, e.concept_id, e.content_span, e.style_span)[1] - e.lambda_s) for e in out
        ]
        const += [abs(mean - e.lambda_s) for e in out]
    out = {"folds": folds, "mae_lambda_s_predicted": ci_dict(pred), "mae_lambda_s_constant": ci_dict(const),
           "predicted_minus_constant": ci_dict(np.subtract(pred, const))}  # fmt: skip
    d = out["predicted_minus_constant"]
    print(f"held-out style names ({len(folds)} folds, {len(pred)} prompts): λ_s MAE predicted "
          f"{np.mean(pred):.3f}, constant {np.mean(const):.3f}, difference {d['mean']:+.3f} "
          f"[{d['low']:+.3f}, {d['high']:+.3f}]")  # fmt: skip
    return out


def ci_dict(values) -> dict:
    ci = confidence_interval(values)
    return {"mean": ci.mean, "low": ci.low, "high": ci.high}


def summarise(rows, train_searches, examples, constant, train_fit) -> dict:
    figures: dict = {"train_examples": len(examples), "constant_lambda": list(constant),
                     "train_fit_mae": [float(v) for v in train_fit]}  # fmt: skip
    # the signal the encoder has to find: training labels by what the spans ask for
    by_kind = {}
    for s in train_searches:
        for p, (lc, ls) in zip(s.prompts, s.labels(), strict=True):
            by_kind.setdefault(f"content:{p.content_kind}", []).append(lc)
            by_kind.setdefault(f"style:{p.style_kind}", []).append(ls)
    figures["train_label_by_kind"] = {k: ci_dict(v) for k, v in by_kind.items()}
    spread = np.concatenate([s.scores.max(1) - s.scores.min(1) for s in train_searches])
    figures["train_grid_spread"] = ci_dict(spread)  # how much λ matters at all, per prompt

    groups = [(t, lambda r, t=t: r["type"] == t) for t in EXTENSION_TYPES]
    groups += [(f"style:{k}", lambda r, k=k: r["style_kind"] == k) for k in ("trigger", "name", "other")]
    groups += [(f"content:{k}", lambda r, k=k: r["content_kind"] == k) for k in ("subject", "other")]
    groups += [(f"style words:{k}", lambda r, k=k: r["style_words"] == k) for k in ("seen", "new")]
    groups += [("all", lambda r: True)]
    figures["groups"], table = {}, []
    for name, keep in groups:
        sel = [r for r in rows if keep(r)]
        if not sel:
            continue
        label = np.array([r["label"] for r in sel])
        entry: dict = {"n": len(sel)}
        for choice in ("predicted", "constant", "default", "grid_best"):
            err = np.abs(np.array([r[choice] for r in sel]) - label).mean(0)
            entry[f"mae_{choice}"] = {"lambda_c": float(err[0]), "lambda_s": float(err[1])}
        entry["mean_predicted"] = np.array([r["predicted"] for r in sel]).mean(0).tolist()
        for choice in CHOICES:
            entry[f"score_{choice}"] = ci_dict([r[f"score_{choice}"] for r in sel])
        for base in ("default", "constant"):
            entry[f"predicted_minus_{base}"] = ci_dict(
                [r["score_predicted"] - r[f"score_{base}"] for r in sel]
            )
        figures["groups"][name] = entry
        d, c = entry["predicted_minus_default"], entry["predicted_minus_constant"]
        table.append([name, len(sel), entry["mae_predicted"]["lambda_s"], entry["mae_constant"]["lambda_s"],
                      entry["mae_predicted"]["lambda_c"], entry["mae_constant"]["lambda_c"],
                      *[entry[f"score_{ch}"]["mean"] for ch in CHOICES],
                      f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]",
                      f"{c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"])  # fmt: skip
    print_table(["group", "n", "MAE λs pred", "MAE λs const", "MAE λc pred", "MAE λc const",
                 *[f"score {c}" for c in CHOICES], "pred - default [95% CI]", "pred - const [95% CI]"],
                table)  # fmt: skip
    return figures


def plot(rows: list[dict], figures: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    from lorafuse.utils.atomic import atomic_path

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    markers = {"I": "o", "II": "s", "III": "^"}
    for ax, j, symbol, key, colours in (
        (axes[0], 0, "λ_c", "content_kind", {"subject": "tab:blue", "other": "tab:gray"}),
        (axes[1], 1, "λ_s", "style_kind", {"trigger": "tab:red", "name": "tab:purple", "other": "tab:gray"}),
    ):
        for kind, colour in colours.items():
            for t, m in markers.items():
                sel = [r for r in rows if r[key] == kind and r["type"] == t]
                if sel:
                    ax.scatter([r["label"][j] for r in sel], [r["predicted"][j] for r in sel], c=colour, marker=m,
                               s=20, label=f"{kind}, type {t}")  # fmt: skip
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set(xlabel=f"{symbol} label (soft, test grid)", ylabel=f"predicted {symbol}",
               title=f"{symbol} on unseen span texts")  # fmt: skip
        ax.legend(fontsize=6, ncol=2)
    kinds = [k for k in ("I", "II", "III", "all") if k in figures["groups"]]
    width = 0.2
    for i, choice in enumerate(CHOICES):
        e = [figures["groups"][k][f"score_{choice}"] for k in kinds]
        means = np.array([v["mean"] for v in e])
        err = np.array([[v["mean"] - v["low"] for v in e], [v["high"] - v["mean"] for v in e]])
        axes[2].bar(np.arange(len(kinds)) + (i - 1.5) * width, means, width, yerr=np.nan_to_num(err),
                    label=choice)  # fmt: skip
    axes[2].set(xticks=range(len(kinds)), xticklabels=[f"type {k}" if k != "all" else k for k in kinds],
                ylabel="oracle harmonic score", title="fresh-seed score by λ choice (95% CI)")  # fmt: skip
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
