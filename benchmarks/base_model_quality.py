"""Quality bar of the built-in base model, judged by the oracle on seen class x style prompts.

Samples N images (every seen class x seen style prompt, cycling, several seeds), asks the oracle which class
and which style each image shows, and reports accuracy overall, per class and per style, plus a sample grid.

    python -m benchmarks.base_model_quality [--n 240] [--steps 25] [--guidance 4] [--base PATH] [--oracle PATH]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import RESULTS, print_table, write_result
from lorafuse.models.world import load_world_pipeline
from lorafuse.utils.images import labelled_grid, save_image, to_uint8
from lorafuse.world.catalog import CLASS_NAMES, SEEN_STYLES, style_phrase
from lorafuse.world.oracle import Oracle


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--base", default=None)
    ap.add_argument("--oracle", default=None, help="oracle weights (default: shipped)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pipe = load_world_pipeline(args.base)
    oracle = Oracle.load(args.oracle)
    pairs = [(c, s) for c in CLASS_NAMES for s in SEEN_STYLES]
    rng = np.random.default_rng(args.seed)
    order = [pairs[int(i)] for i in np.concatenate([rng.permutation(len(pairs)) for _ in range(-(-args.n // len(pairs)))])]
    order = order[: args.n]
    images = []
    t0 = time.perf_counter()
    for i in range(0, args.n, 40):
        chunk = order[i : i + 40]
        out = pipe([f"a photo of a {c}, in {style_phrase(s)} style" for c, s in chunk], num_inference_steps=args.steps,
                   guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed + i),
                   output_type="np", height=64, width=64).images
        images.append(to_uint8(out))
        print(f"{i + len(chunk)}/{args.n} images", flush=True)
    seconds = time.perf_counter() - t0
    images = np.concatenate(images)
    v = oracle.judge(images)
    cls_ok = np.array([p == c for p, (c, _) in zip(v.cls, order, strict=True)])
    sty_ok = np.array([p == s for p, (_, s) in zip(v.style_name, order, strict=True)])
    per_class = {c: float(cls_ok[[k for k, (cc, _) in enumerate(order) if cc == c]].mean()) for c in CLASS_NAMES}
    per_style = {s: float(sty_ok[[k for k, (_, ss) in enumerate(order) if ss == s]].mean()) for s in SEEN_STYLES}
    fig = {"n": args.n, "class_accuracy": float(cls_ok.mean()), "style_accuracy": float(sty_ok.mean()),
           "both_correct": float((cls_ok & sty_ok).mean()), "seconds_per_image": seconds / args.n,
           "per_class_accuracy": per_class, "per_style_accuracy": per_style}
    print_table(["measure", "value"], [[k, v] for k, v in fig.items() if not isinstance(v, dict)])
    print_table(["class", "class acc"], [[k, v] for k, v in per_class.items()])
    print_table(["style", "style acc"], [[k, v] for k, v in per_style.items()])
    write_result("base_model_quality", vars(args), fig)
    # a class x style picture for the README: first sample of each (class, style) pair found
    first = {}
    for k, pair in enumerate(order):
        first.setdefault(pair, images[k])
    blank = np.full_like(images[0], 255)
    tiles = [[first.get((c, s), blank) for s in SEEN_STYLES] for c in CLASS_NAMES]
    save_image(labelled_grid(tiles, list(CLASS_NAMES), list(SEEN_STYLES), title="built-in base model samples"),
               RESULTS / "base_model_samples.png")


if __name__ == "__main__":
    main()
