"""Does LoRA training on the built-in world learn? Oracle scores of trigger prompts before and after the LoRA.

Subjects: a content LoRA per held-out individual (5 images, `train.world_personalize.subject_recipe`), prompted as
"a photo of a sks teapot, in <seen style> style" over the first seen styles (flat, outlined, ...; up to 4 of them
the LoRA never saw the individual in: its images are in `personalize.SUBJECT_STYLES`). Styles: a
style LoRA per held-out style (1 image, `style_recipe`), prompted as "a photo of a <colour> <class>, in sks style"
over several seen individuals. "before" is the base model on the very same prompts, seeds and steps without the
LoRA (the base has never seen the individual or the style, so 'sks' means nothing to it); "after" adds the LoRA.

Scores (`eval.metrics.OracleScorer`): subjects -> oracle content similarity to clean renders of the individual
and the right-individual rate; styles -> oracle style similarity and the right-style rate.
Intervals (95 %): per LoRA row over its images (Student t for similarities, Wilson for rates); the pooled rows
("all subjects", "all styles") over per-LoRA means, because images of one LoRA are not independent draws.
"delta" is the paired after - before difference (same prompt and seed). "VAE round trip" (subjects): the
individual's own renders in the prompt styles, encoded and decoded by the base's VAE, then scored: generated
images come out of that decoder, so this is about what a LoRA on the UNet alone can reach. --curve-points > 0 also keeps the
trainer's intermediate LoRAs and scores them (fewer seeds): the learning curve over epochs, epoch 0 = the base.

    python -m benchmarks.lora_learning [--individuals teapot_08 robot_09 ...] [--styles crayon blueprint mosaic]
        [--train-seeds 0 1] [--seeds 4] [--steps 25] [--guidance 4] [--curve-points 4] [--smoke]
        [--subject-settings '{"styles": ["flat"], "layers": "attn", "conv_rank": 0, "learning_rate": 5e-4}']
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, print_table, write_result
from lorafuse.eval.measures import metric
from lorafuse.eval.metrics import OracleScorer, confidence_interval, world_references
from lorafuse.fusion.sampling import sample
from lorafuse.lora.inject import delete_adapter, inject_lora
from lorafuse.lora.io import load_lora
from lorafuse.models.world import load_world_pipeline
from lorafuse.train.world_personalize import epoch_checkpoints, style_recipe, subject_recipe, train_world_lora
from lorafuse.utils.images import labelled_grid, save_image, to_uint8
from lorafuse.world.catalog import (
    HELD_OUT_STYLES,
    SEEN_STYLES,
    all_individuals,
    parse_individual,
    style_phrase,
)
from lorafuse.world.oracle import default_oracle, to_tensor
from lorafuse.world.render import render

# held-out individuals of four different classes (shapes as far apart as the world has)
DEFAULT_INDIVIDUALS = ("teapot_08", "robot_09", "fish_08", "house_09")
# smoke runs train shorter recipes: they hash to other names, so they never pass for the real LoRAs in a cache
SMOKE_RECIPES = {"subject": {"epochs": 4}, "style": {"epochs": 8}}
MEASURES = {"subject": ("oracle_content", "right_individual"), "style": ("oracle_style", "right_style")}


def subject_prompts(name: str, n_styles: int) -> list[str]:
    # the subject dataset's own caption wording, over seen styles other than its training styles
    return [f"a photo of a sks {parse_individual(name).cls}, in {style_phrase(s)} style" for s in SEEN_STYLES[:n_styles]]


def style_prompts(n: int, seed: int = 0) -> list[str]:
    # the style dataset's caption wording on random seen individuals (fixed across styles: paired comparisons)
    seen = all_individuals(held_out=False)
    picks = np.random.default_rng([seed, 7]).choice(len(seen), size=n, replace=False)
    return [f"a photo of a {seen[i].colour_names[0]} {seen[i].cls}, in sks style" for i in picks]


@contextmanager
def lora_applied(pipe, path: Path | None):
    """The pipeline with the LoRA at `path` injected at weight 1 (None: the base as it is)."""
    if path is None:
        yield pipe
        return
    inject_lora(pipe, load_lora(path, base=pipe), "learned")
    try:
        yield pipe
    finally:
        delete_adapter(pipe, "learned")


def generate(pipe, prompts: list[str], seeds: int, args) -> np.ndarray:
    """(len(prompts) * seeds, H, W, 3) uint8, prompt-major; image k from noise seed k (same in before and after)."""
    res = sample(pipe, prompts, num_images=seeds, steps=args.steps, guidance=args.guidance, seed=0, progress=False)
    return to_uint8(res.images)


def vae_round_trip(pipe, scorer, name: str, n_styles: int, seeds: int) -> dict[str, np.ndarray]:
    """Oracle scores of VAE-reconstructed renders of `name`, `seeds` per prompt style (see the docstring)."""
    ind = parse_individual(name)
    renders = np.stack([render(ind, style, np.random.default_rng([k, 555])) for style in SEEN_STYLES[:n_styles]
                        for k in range(seeds)])  # fmt: skip
    param = next(pipe.vae.parameters())
    with torch.no_grad():
        x = to_tensor(renders).to(param.device, param.dtype)
        back = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
    return scorer(to_uint8((back.permute(0, 2, 3, 1).float().cpu().numpy() + 1) / 2))


def interval(measure: str, values: np.ndarray):
    return metric(measure).aggregate(values)


def train(kind: str, name: str, seed: int, args):
    recipe = (subject_recipe if kind == "subject" else style_recipe)(name, seed=seed, **args.recipe_overrides[kind])
    every = max(1, recipe.epochs // args.curve_points) if args.curve_points else None
    t = time.perf_counter()
    path = train_world_lora(recipe, args.work_dir, progress=False, save_every_n_epochs=every)
    print(f"{kind} {name} seed {seed}: {path.name} ({time.perf_counter() - t:.0f} s)", flush=True)
    return recipe, path


def evaluate_lora(pipe, scorer, kind: str, name: str, seed: int, prompts: list[str], args, before: dict):
    """Final LoRA (all seeds) and its intermediate epochs (--curve-seeds); returns its record and a sample."""
    recipe, path = train(kind, name, seed, args)
    with lora_applied(pipe, path):
        images = generate(pipe, prompts, args.seeds, args)
    after = scorer(images)
    record = {"lora": str(path), "epochs": recipe.epochs}
    for m in MEASURES[kind]:
        record[m] = {"before": before[m].tolist(), "after": after[m].tolist()}
    curve = {}
    if args.curve_points:
        # only the first --curve-seeds images per prompt: a cheaper, same-seed view of the trend
        keep = (np.arange(len(images)) % args.seeds) < args.curve_seeds
        curve[0] = {m: float(before[m][keep].mean()) for m in MEASURES[kind]}
        for epoch, file in epoch_checkpoints(recipe, args.work_dir).items():
            if epoch == recipe.epochs:
                scores = {m: after[m][keep] for m in MEASURES[kind]}
            else:
                with lora_applied(pipe, file):
                    scores = scorer(generate(pipe, prompts, args.curve_seeds, args))
            curve[epoch] = {m: float(np.mean(scores[m])) for m in MEASURES[kind]}
    record["curve"] = curve
    return record, images


def summarise(kind: str, records: dict[str, list[dict]]) -> tuple[list[list], dict]:
    """Table rows and figures: one row per (LoRA name, measure), then the pooled row over per-LoRA means."""
    rows, figures = [], {}
    pooled = {m: {"before": [], "after": [], "delta": []} for m in MEASURES[kind]}
    for name, recs in records.items():
        figures[name] = {}
        for m in MEASURES[kind]:
            b = np.concatenate([r[m]["before"] for r in recs])
            a = np.concatenate([r[m]["after"] for r in recs])
            entry = {"before": interval(m, b), "after": interval(m, a), "delta": confidence_interval(a - b)}
            figures[name][m] = {k: vars(v) for k, v in entry.items()}
            rows.append([name, m, str(entry["before"]), str(entry["after"]), str(entry["delta"]), len(a)])
            for r in recs:
                pooled[m]["before"].append(np.mean(r[m]["before"]))
                pooled[m]["after"].append(np.mean(r[m]["after"]))
                pooled[m]["delta"].append(np.mean(r[m]["after"]) - np.mean(r[m]["before"]))
        figures[name]["curve"] = [r["curve"] for r in recs]
    label = f"all {kind}s (per-LoRA means)"
    figures[label] = {}
    for m, parts in pooled.items():
        cis = {k: confidence_interval(v) for k, v in parts.items()}
        figures[label][m] = {k: vars(v) for k, v in cis.items()}
        rows.append([label, m, str(cis["before"]), str(cis["after"]), str(cis["delta"]), len(parts["after"])])
    return rows, figures


def mean_curve(records: dict[str, list[dict]], measure: str) -> dict[int, float]:
    """Epoch -> mean over LoRAs of the measure (only epochs every LoRA has)."""
    curves = [r["curve"] for recs in records.values() for r in recs if r["curve"]]
    if not curves:
        return {}
    epochs = sorted(set.intersection(*(set(c) for c in curves)))
    return {e: float(np.mean([c[e][measure] for c in curves])) for e in epochs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--individuals", nargs="*", default=list(DEFAULT_INDIVIDUALS))
    ap.add_argument("--styles", nargs="*", default=list(HELD_OUT_STYLES))
    ap.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1], help="one LoRA per seed (and dataset)")
    ap.add_argument("--seeds", type=int, default=4, help="sampling seeds per prompt")
    ap.add_argument("--prompt-styles", type=int, default=4, help="seen styles in the subject prompts")
    ap.add_argument("--style-prompts", type=int, default=6, help="seen individuals in the style prompts")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--curve-points", type=int, default=4, help="intermediate saves per run (0: none)")
    ap.add_argument("--curve-seeds", type=int, default=2)
    ap.add_argument("--work-dir", type=Path, default=Path("out/lora_learning"), help="LoRA cache (by recipe)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="1 subject, 1 style, short training, few samples")
    ap.add_argument("--subject-settings", type=json.loads, default={}, metavar="JSON",
                    help='subject_recipe overrides, e.g. \'{"layers": "attn"}\'; writes lora_learning_custom.json')  # fmt: skip
    args = ap.parse_args()
    args.recipe_overrides = {"subject": args.subject_settings, "style": {}}
    if args.smoke:
        args.individuals, args.styles, args.train_seeds = args.individuals[:1], args.styles[:1], args.train_seeds[:1]
        args.seeds, args.prompt_styles, args.style_prompts, args.steps = 2, 2, 2, 10
        args.curve_points, args.curve_seeds = 2, 1
        args.recipe_overrides = SMOKE_RECIPES
    if not args.individuals and not args.styles:
        ap.error("give at least one individual or style")
    args.curve_seeds = min(args.curve_seeds, args.seeds)
    torch.set_num_threads(args.threads)

    pipe, oracle = load_world_pipeline(), default_oracle()
    records: dict[str, dict[str, list[dict]]] = {"subject": {}, "style": {}}
    ceiling: dict[str, dict[str, np.ndarray]] = {}
    tiles, row_labels = [], []
    s_prompts = style_prompts(args.style_prompts)
    jobs = [("subject", n, subject_prompts(n, args.prompt_styles)) for n in args.individuals]
    jobs += [("style", s, s_prompts) for s in args.styles]
    for kind, name, prompts in jobs:
        scorer = OracleScorer(oracle, **{"individual" if kind == "subject" else "style": name})
        before_images = generate(pipe, prompts, args.seeds, args)
        before = scorer(before_images)
        if kind == "subject":
            ceiling[name] = vae_round_trip(pipe, scorer, name, args.prompt_styles, args.seeds)
        for seed in args.train_seeds:
            rec, after_images = evaluate_lora(pipe, scorer, kind, name, seed, prompts, args, before)
            records[kind].setdefault(name, []).append(rec)
        # picture: the first seed of each prompt, base above and the last trained LoRA below
        first = np.arange(0, len(prompts) * args.seeds, args.seeds)
        ref = world_references(**{"individual" if kind == "subject" else "style": name}, count=2)
        tiles += [[ref[0], *before_images[first]], [ref[1], *after_images[first]]]
        row_labels += [f"{name} before", f"{name} after"]

    header = ["LoRA", "measure", "before [95% CI]", "after [95% CI]", "delta [95% CI]", "n"]
    figures: dict = {}
    for kind in (k for k in ("subject", "style") if records[k]):
        rows, figs = summarise(kind, records[kind])
        if kind == "subject":
            for name, scores in ceiling.items():
                for m in MEASURES[kind]:
                    figs[name][m]["vae_round_trip"] = vars(interval(m, scores[m]))
                    rows.append([name, m, "VAE round trip", str(interval(m, scores[m])), "", len(scores[m])])
        print_table(header, rows)
        figures[kind] = figs
        figures[f"{kind}_curve"] = {m: mean_curve(records[kind], m) for m in MEASURES[kind]}
        if figures[f"{kind}_curve"][MEASURES[kind][0]]:
            print_table(["epoch", *MEASURES[kind]], [[e, *(figures[f"{kind}_curve"][m][e] for m in MEASURES[kind])]
                                                      for e in figures[f"{kind}_curve"][MEASURES[kind][0]]])
        print()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["subject_prompts"] = {n: subject_prompts(n, args.prompt_styles) for n in args.individuals}
    config["style_prompts"] = s_prompts
    name = "lora_learning_smoke" if args.smoke else "lora_learning_custom" if args.subject_settings else "lora_learning"
    write_result(name, config, figures)
    width = max(len(r) for r in tiles)
    blank = np.full_like(tiles[0][0], 255)
    tiles = [r + [blank] * (width - len(r)) for r in tiles]
    cols = ["reference", *(f"prompt {k + 1}" for k in range(width - 1))]
    picture = labelled_grid(tiles, row_labels, cols, title="base (before) vs + LoRA (after), same prompts and seeds")
    print(f"wrote {save_image(picture, RESULTS / f'{name}.png')}")


if __name__ == "__main__":
    main()
