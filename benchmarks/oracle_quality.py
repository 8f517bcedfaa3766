"""How good is the oracle? Retrieval across the other factor, and invariance, on fresh held-out renders.

- individual retrieval across styles: a query render of individual i in style a; gallery = one render of every
  individual (all 120, incl. held-out ones) in style b != a; top-1 correct if the nearest content embedding is i.
- style retrieval across contents: query in style s on individual i; gallery = one render of every style on
  individual j != i; top-1 correct if the nearest style embedding is s.
- invariance: mean content cosine between renders of the same individual+pose in two styles (should be high),
  vs different individuals of the same class in one style (should be low); and the same for style.
- decoded renders: the gallery sent through the base model's VAE (encode, decode) and judged again. Every
  generated image is decoded by that VAE, so its round-trip accuracy is the ceiling of any base-model or LoRA
  figure the oracle gives (it loses some colour and thin parts; the oracle is then judging a harder image).
All renders use seeds never used in training (the training pool used seeds [1, k]).

    python benchmarks/oracle_quality.py [--queries 600] [--base PIPELINE_FOLDER]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.common import print_table, write_result
from lorafuse.world.catalog import CLASS_NAMES, STYLE_NAMES, all_individuals
from lorafuse.world.oracle import Oracle
from lorafuse.world.render import Pose, render


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=600)
    ap.add_argument("--oracle", default=None)
    ap.add_argument("--base", default=None, help="pipeline folder whose VAE decodes the gallery (default: shipped)")
    args = ap.parse_args()
    torch.manual_seed(0)
    oracle = Oracle.load(args.oracle)
    people = all_individuals()
    rng = np.random.default_rng(12345)
    n_ind, n_sty = len(people), len(STYLE_NAMES)

    # galleries: one render of every individual in every style (fresh seeds)
    gallery = np.stack([render(p, s, np.random.default_rng([777, i, j])) for i, p in enumerate(people)
                        for j, s in enumerate(STYLE_NAMES)])
    g = oracle.judge(gallery)
    g_content = g.content.view(n_ind, n_sty, -1)
    g_style = g.style.view(n_ind, n_sty, -1)

    ind_hits, sty_hits, ind_hits_held = [], [], []
    same_ind_cross_style, diff_ind_same_style, same_sty_cross_ind, diff_sty_same_ind = [], [], [], []
    for q in range(args.queries):
        i, a = int(rng.integers(n_ind)), int(rng.integers(n_sty))
        b = int((a + 1 + rng.integers(n_sty - 1)) % n_sty)
        pose = Pose.random(rng)
        img = render(people[i], STYLE_NAMES[a], np.random.default_rng([888, q]), pose=pose)
        v = oracle.judge(img[None])
        hit = int((g_content[:, b] @ v.content[0]).argmax()) == i
        ind_hits.append(hit)
        if people[i].held_out:
            ind_hits_held.append(hit)
        j = int((i + 1 + rng.integers(n_ind - 1)) % n_ind)
        sty_hits.append(int((g_style[j] @ v.style[0]).argmax()) == a)
        # invariance probes with the same pose
        other_style = render(people[i], STYLE_NAMES[b], np.random.default_rng([889, q]), pose=pose)
        same_cls = [k for k, p in enumerate(people) if p.cls == people[i].cls and k != i]
        other_ind = render(people[int(rng.choice(same_cls))], STYLE_NAMES[a], np.random.default_rng([890, q]), pose=pose)
        w = oracle.judge(np.stack([other_style, other_ind]))
        same_ind_cross_style.append(float(w.content[0] @ v.content[0]))
        diff_ind_same_style.append(float(w.content[1] @ v.content[0]))
        same_sty_cross_ind.append(float(w.style[1] @ v.style[0]))
        diff_sty_same_ind.append(float(w.style[0] @ v.style[0]))

    cls_pred = g.cls
    cls_true = [p.cls for p in people for _ in STYLE_NAMES]
    fig = {
        "individual_top1_across_styles": float(np.mean(ind_hits)),
        "individual_top1_across_styles_held_out_only": float(np.mean(ind_hits_held)) if ind_hits_held else None,
        "style_top1_across_contents": float(np.mean(sty_hits)),
        "class_accuracy_gallery": float(np.mean([a == b for a, b in zip(cls_pred, cls_true, strict=True)])),
        "content_cos_same_individual_other_style": float(np.mean(same_ind_cross_style)),
        "content_cos_other_individual_same_class_same_style": float(np.mean(diff_ind_same_style)),
        "style_cos_same_style_other_content": float(np.mean(same_sty_cross_ind)),
        "style_cos_other_style_same_content": float(np.mean(diff_sty_same_ind)),
        "classes": len(CLASS_NAMES), "styles": n_sty, "individuals": n_ind,
        **decoded_accuracy(oracle, gallery, people, args.base),
    }
    print_table(["measure", "value"], [[k, v] for k, v in fig.items()])
    write_result("oracle_quality", vars(args), fig)


def decoded_accuracy(oracle: Oracle, gallery: np.ndarray, people: list, base: str | None) -> dict:
    """Class, style and individual accuracy of the oracle on VAE round trips of the gallery (index = ind x style)."""
    from lorafuse.models.world import load_world_pipeline
    from lorafuse.world.oracle_train import vae_round_trip

    v = oracle.judge(vae_round_trip(gallery, load_world_pipeline(base).vae))
    true_ind = [p for p in people for _ in STYLE_NAMES]
    return {
        "decoded_class_accuracy": float(np.mean([a == p.cls for a, p in zip(v.cls, true_ind, strict=True)])),
        "decoded_style_accuracy": float(np.mean([a == s for a, s in zip(v.style_name, STYLE_NAMES * len(people),
                                                                         strict=True)])),
        "decoded_individual_accuracy": float(np.mean([a == p.name for a, p in zip(v.individual, true_ind,
                                                                                strict=True)])),
    }


if __name__ == "__main__":
    main()
