"""CRAFT-LoRA's ablation (the paper's Table 6b) on the built-in world, judged by the oracle.

Rows: {with, without} the rank-limited backbone W' x {ACFG (window schedule), symmetric CFG (LoRAs on both
branches, window schedule), ACFG with constant ω, ACFG with the smooth cosine schedule φ (App. C)}. With the backbone, the LoRAs are trained ON the backbone
(recipe base = the backbone folder) and fused with option `backbone`; without it, trained and fused on the world
base. Held-out individuals x held-out styles, several seeds; prompt "a sks CLASS <c> in sks style <s>".

Per image (same pair, seed and row): c = oracle content similarity, s = style similarity (`OracleScorer`),
single-LoRA images by the same row with the other λ at 0, then `cross_influence`, `ci_product`, harmonic mean.
Each row: mean and 95% t interval over pairs x seeds (images of one pair share its LoRAs, so the intervals are
somewhat optimistic), and the paired difference to the full method (backbone + ACFG) over the same images.

The backbone: a render-mode pairs dataset (10 x 10) and `backbone.train.train_backbone` for --backbone-steps
(batch 8), written once under --work-dir and reused; or --backbone DIR.

    python -m benchmarks.craft_ablation [--subjects teapot_08,robot_09] [--styles crayon,blueprint,mosaic]
        [--seeds 4] [--steps 20] [--backbone-steps 500] [--threads 2]
    python -m benchmarks.craft_ablation --smoke    # 1 pair, 2 seeds, 8 steps, 10 backbone steps, short LoRAs
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import print_table, write_result
from lorafuse.eval.expert_world import craft_oracle_scores
from lorafuse.eval.metrics import (
    OracleScorer,
    ci_product,
    confidence_interval,
    cross_influence,
    harmonic_mean,
    proportion_interval,
)
from lorafuse.lora.io import load_lora
from lorafuse.models.load import load_base_pipeline
from lorafuse.train.world_personalize import style_recipe, subject_recipe, train_world_lora
from lorafuse.world.catalog import parse_individual
from lorafuse.world.oracle import default_oracle

GUIDANCE_ROWS = {  # label -> craft options
    "ACFG": {},
    "symmetric CFG": {"symmetric": True},
    "ACFG constant ω": {"schedule": "constant"},
    "ACFG smooth φ": {"schedule": "smooth"},  # the paper's App. C cosine φ(u) = ½(1 + cos πu), against its window
}
FULL = "backbone + ACFG"
METRICS = ("content", "style", "harmonic", "cross_influence", "ci_product")
RATES = ("right_individual", "right_style")  # 0/1 per image: Wilson intervals


def backbone_folder(args) -> Path:
    """--backbone, or train one (once: reused when its folder is complete) on a render-mode pairs dataset."""
    from lorafuse.backbone.pairs import build_pairs_dataset
    from lorafuse.backbone.train import INFO_FILE, BackboneConfig, train_backbone

    if args.backbone:
        return Path(args.backbone)
    work = Path(args.work_dir)
    out = work / f"backbone_{args.backbone_steps}steps"
    if (out / "backbone" / INFO_FILE).exists():
        return out / "backbone"
    pairs = work / "pairs_render_s0"
    if not (pairs / "contact_sheet.png").exists():
        build_pairs_dataset(pairs, mode="render", progress=False)
    t = time.perf_counter()
    warmup = min(500, args.backbone_steps // 10)  # the paper's 500 warm-up steps assume 5000 steps
    folder = train_backbone(BackboneConfig(pairs=pairs, output_dir=out, steps=args.backbone_steps,
                                           warmup_steps=warmup), progress=False)  # fmt: skip
    print(f"backbone: {args.backbone_steps} steps in {time.perf_counter() - t:.0f} s -> {folder}", flush=True)
    return folder


def score_pair(pipe, loras, individual, style, options, scorer, args) -> dict[str, np.ndarray]:
    """Per-seed metrics of one (pair, row): fused, content-only and style-only images."""
    cls = parse_individual(individual).cls
    prompt = [f"a sks {cls} <c> in sks style <s>"]
    settings = {"seeds": args.seeds, "steps": args.steps, "guidance": args.guidance, **options}
    fused = craft_oracle_scores(pipe, *loras, prompt, scorer, lambda_c=1.0, lambda_s=1.0, **settings)
    only_c = craft_oracle_scores(pipe, *loras, prompt, scorer, lambda_c=1.0, lambda_s=0.0, **settings)
    only_s = craft_oracle_scores(pipe, *loras, prompt, scorer, lambda_c=0.0, lambda_s=1.0, **settings)
    c, s = fused["content"][0], fused["style"][0]
    return {
        "content": c, "style": s, "harmonic": harmonic_mean(c, s),
        "cross_influence": cross_influence(only_c["content"][0], c, only_s["style"][0], s),
        "ci_product": ci_product(c, s), "content_single": only_c["content"][0], "style_single": only_s["style"][0],
        "right_individual": fused["right_individual"][0], "right_style": fused["right_style"][0],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", default="teapot_08,robot_09")
    ap.add_argument("--styles", default="crayon,blueprint,mosaic")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--backbone-steps", type=int, default=500)
    ap.add_argument("--backbone", default=None, help="an existing backbone folder (skips training one)")
    ap.add_argument("--lora-epochs", type=int, default=0, help="0: the world recipes' defaults")
    ap.add_argument("--work-dir", default="out/craft_bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.subjects, args.styles, args.seeds, args.steps = "teapot_08", "crayon", 2, 8
        args.backbone_steps, args.lora_epochs = 10, 4
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    subjects, styles = args.subjects.split(","), args.styles.split(",")
    backbone = backbone_folder(args)
    extra = {"epochs": args.lora_epochs} if args.lora_epochs else {}

    def loras(individual, style, base):
        c = train_world_lora(subject_recipe(individual, layers="craft", base=base, **extra), args.work_dir,
                             progress=False)  # fmt: skip
        s = train_world_lora(
            style_recipe(style, layers="craft", base=base, **extra), args.work_dir, progress=False
        )
        return load_lora(c, base=pipe), load_lora(s, base=pipe)

    pipe, oracle = load_base_pipeline("world"), default_oracle()
    rows = {f"{b} + {g}": (b, opts) for b in ("backbone", "no backbone") for g, opts in GUIDANCE_ROWS.items()}
    per_row: dict[str, dict[str, list]] = {r: {m: [] for m in (*METRICS, *RATES, "pair")} for r in rows}
    for ind in subjects:
        for sty in styles:
            scorer = OracleScorer(oracle, individual=ind, style=sty)
            pair_loras = {"backbone": loras(ind, sty, str(backbone)), "no backbone": loras(ind, sty, "world")}
            for label, (b, opts) in rows.items():
                options = {**opts, **({"backbone": backbone} if b == "backbone" else {})}
                got = score_pair(pipe, pair_loras[b], ind, sty, options, scorer, args)
                for m in (*METRICS, *RATES):
                    per_row[label][m].extend(got[m].tolist())
                per_row[label]["pair"].extend([f"{ind}:{sty}"] * args.seeds)
            print(f"{ind} x {sty} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    figures: dict = {"backbone": str(backbone), "rows": {}, "per_image": per_row}
    table = []
    for label in rows:
        entry = {m: confidence_interval(per_row[label][m]) for m in METRICS}
        entry |= {m: proportion_interval(per_row[label][m]) for m in RATES}
        for m in ("harmonic", "cross_influence"):
            diff = np.array(per_row[label][m]) - np.array(per_row[FULL][m])  # paired: same pair and seed
            entry[f"{m}_minus_full"] = confidence_interval(diff)
        figures["rows"][label] = {k: dataclasses.asdict(v) for k, v in entry.items()}
        table.append([label, *[str(entry[m]) for m in (*METRICS[:4], "harmonic_minus_full",
                                                       "cross_influence_minus_full", *RATES)]])  # fmt: skip
    figures["seconds"] = time.perf_counter() - t0
    n = len(subjects) * len(styles)
    print(f"\n{n} pairs x {args.seeds} seeds, {args.steps} steps, CFG {args.guidance}, backbone {backbone}; "
          "mean [95% CI]")  # fmt: skip
    header = ["row", "content", "style", "harmonic", "cross-infl.", "Δharm. vs full", "Δcross vs full"]
    print_table([*header, "right individual", "right style"], table)
    write_result("craft_ablation" + ("_smoke" if args.smoke else ""), vars(args), figures)


if __name__ == "__main__":
    main()
