"""What does ZipLoRA's merge cost on real LoRAs: seconds, and steps until its early stop?

Trained world LoRAs (`train.world_personalize`, the recipes `benchmarks.lora_learning` uses, so a cache shared through
--work-dir trains nothing twice): every held-out individual in --individuals paired with every style in --styles.
Each pair is merged with the registry's ZipLoRA plan, exactly as `lorafuse.fuse(method="ziplora")` does it: encode
the two references (each LoRA's first training image and its caption), learn the mergers (Adam lr 0.01, λ 0.01,
at most --max-steps, early stop once the mean per-layer |cos(m_c, m_s)| < 0.05), fuse. "merge s" is that whole
plan, wall-clock; "steps" how many merger steps ran; "stopped early" whether the early stop fired before
--max-steps. --merge-seeds draws other noise and timesteps for the merger training (a spread per pair).
Medians and IQRs over all merges (`benchmarks.timing.spread`).

    python -m benchmarks.ziplora_cost [--individuals teapot_08 robot_09 ...] [--styles crayon blueprint mosaic]
        [--merge-seeds 0 1] [--max-steps 100] [--threads 2] [--smoke]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import print_table, write_result
from benchmarks.lora_learning import DEFAULT_INDIVIDUALS, SMOKE_RECIPES
from benchmarks.timing import spread
from lorafuse.fusion.registry import get_method, make_config
from lorafuse.lora.io import load_lora
from lorafuse.models.world import load_world_pipeline
from lorafuse.train.world_personalize import WorldLoraRecipe, style_recipe, subject_recipe, train_world_lora
from lorafuse.world.catalog import HELD_OUT_STYLES


def first_training_example(recipe: WorldLoraRecipe, work_dir: Path) -> tuple[np.ndarray, str]:
    """The LoRA's own first training image and caption (what the ZipLoRA paper uses as references)."""
    data = work_dir / "data" / recipe.stem
    image = min(p for p in data.glob("*/*.png") if p.parent.name[0].isdigit())  # '<repeats>_<trigger> ...'
    return np.asarray(Image.open(image).convert("RGB")), image.with_suffix(".txt").read_text().strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--individuals", nargs="+", default=list(DEFAULT_INDIVIDUALS[:2]))
    ap.add_argument("--styles", nargs="+", default=list(HELD_OUT_STYLES))
    ap.add_argument("--merge-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--work-dir", type=Path, default=Path("out/lora_learning"), help="LoRA cache (by recipe)")
    ap.add_argument("--threads", type=int, default=1, help="1: timings stay sane on a shared CPU (2 threads under contention spin)")
    ap.add_argument("--smoke", action="store_true", help="1 pair, 1 seed, 3 steps, short LoRA recipes")
    args = ap.parse_args()
    overrides = {"subject": {}, "style": {}}
    if args.smoke:
        args.individuals, args.styles, args.merge_seeds, args.max_steps = args.individuals[:1], args.styles[:1], [0], 3
        overrides = SMOKE_RECIPES
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    pipe = load_world_pipeline()
    method = get_method("ziplora")()
    loras = {}
    for kind, names, make in (("subject", args.individuals, subject_recipe), ("style", args.styles, style_recipe)):
        for name in names:
            recipe = make(name, **overrides[kind])
            path = train_world_lora(recipe, args.work_dir, progress=False)
            image, prompt = first_training_example(recipe, args.work_dir)
            loras[name] = (load_lora(path, base=pipe), image, prompt)

    rows, merges = [], []
    for individual in args.individuals:
        for style_name in args.styles:
            (content, c_img, c_prompt), (style, s_img, s_prompt) = loras[individual], loras[style_name]
            for seed in args.merge_seeds:
                config = make_config("ziplora", content_image=c_img, content_prompt=c_prompt, style_image=s_img,
                                     style_prompt=s_prompt, max_steps=args.max_steps, seed=seed)  # fmt: skip
                t = time.perf_counter()
                plan = method.plan(pipe, content, style, config)
                merge_s = time.perf_counter() - t
                plan.close()
                tr = plan.record["training"]
                m = {"content": individual, "style": style_name, "seed": seed, "merge_s": merge_s,
                     "train_s": tr["seconds"], "steps": tr["steps"], "stopped_early": tr["converged"],
                     "final_similarity": tr["final_similarity"], "final_loss": tr["final_loss"]}  # fmt: skip
                merges.append(m)
                rows.append([f"{individual} + {style_name}", seed, merge_s, tr["steps"], tr["converged"],
                             tr["final_similarity"]])  # fmt: skip
                print(f"{individual} + {style_name} seed {seed}: {merge_s:.1f} s, {tr['steps']} steps", flush=True)

    print_table(["pair", "seed", "merge s", "steps", "stopped early", "final mean |cos|"], rows)
    figures = {
        "merges": merges,
        "merge_s": spread([m["merge_s"] for m in merges]),
        "steps": spread([m["steps"] for m in merges]),
        "seconds_per_step": spread([m["train_s"] / m["steps"] for m in merges]),
        "stopped_early_rate": float(np.mean([m["stopped_early"] for m in merges])),
    }
    print(f"merge s median {figures['merge_s']['median']:.1f} (IQR {figures['merge_s']['iqr']:.1f}), steps median "
          f"{figures['steps']['median']:.0f} (IQR {figures['steps']['iqr']:.0f}), early stop in "
          f"{figures['stopped_early_rate']:.0%} of {len(merges)} merges")  # fmt: skip
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["recipe_overrides"] = overrides
    write_result("ziplora_cost_smoke" if args.smoke else "ziplora_cost", config, figures)


if __name__ == "__main__":
    main()
