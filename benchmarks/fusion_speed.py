"""How much does each fusion method cost at sampling time, relative to the base model with no LoRA?

Same prompt, steps and seed for every row, in one run. Besides every registered method (default options), K-LoRA
is measured in its variants and against a faithful per-step-recompute implementation
(`fusion.klora_reference.NaiveKLoraHook`: ΔW = s B A, |ΔW|, Top-K and γ recomputed at every step, as the official
code does; "per call" recomputes at every projection call, which is exactly the official code's cost).
LoRAs: random, on every UNet attention projection (what K-LoRA chooses between), rank --rank.
Times: the median of --repeats runs after one warm-up; plan time (inject, fuse, precompute) is reported apart.

    python -m benchmarks.fusion_speed [--base world-random] [--steps 20] [--repeats 3] [--rank 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from benchmarks.common import print_table, write_result
from lorafuse.errors import UserInputError
from lorafuse.fusion.klora_reference import NaiveKLoraHook
from lorafuse.fusion.registry import get_method, make_config, method_names
from lorafuse.fusion.sampling import sample
from lorafuse.fusion.synthetic import random_lora
from lorafuse.models.load import load_base_pipeline

PROMPT = "a red car in the city"


def timed_sample(pipe, args, hooks=(), guidance=7.5) -> float:
    times = []
    for k in range(args.repeats + 1):
        t = time.perf_counter()
        sample(pipe, PROMPT, steps=args.steps, seed=0, guidance=guidance, hooks=hooks, progress=False)
        if k:  # the first run warms caches and allocators
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="world-random")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--skip-per-call", action="store_true", help="skip the slowest row (official per-call recompute)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    pipe = load_base_pipeline(args.base)
    content = random_lora(pipe, seed=1, rank=args.rank, scale=0.1)
    style = random_lora(pipe, seed=2, rank=args.rank, scale=0.1)
    base_s = timed_sample(pipe, args)
    rows: list[list] = [["base (no LoRA)", 0.0, base_s, 1.0]]
    figures: dict[str, dict] = {"base": {"sample_s": base_s}}

    variants: list[tuple[str, str, dict]] = [(m, m, {}) for m in method_names()]
    variants += [
        ("klora mechanism=adapter", "klora", {"mechanism": "adapter"}),
        ("klora official", "klora", {"klora_mode": "official"}),
        ("switch mechanism=adapter", "switch", {"mechanism": "adapter"}),
        ("composite mechanism=adapter", "composite", {"mechanism": "adapter"}),
    ]
    for label, method, options in variants:
        t = time.perf_counter()
        try:
            plan = get_method(method)().plan(pipe, content, style, make_config(method, **options))
        except UserInputError as e:  # e.g. ZipLoRA without reference images
            print(f"skipped {label}: {e}")
            continue
        plan_s = time.perf_counter() - t
        try:
            sample_s = timed_sample(pipe, args, plan.hooks, plan.guidance(7.5))
        finally:
            plan.close()
        rows.append([label, plan_s, sample_s, sample_s / base_s])
        figures[label] = {"plan_s": plan_s, "sample_s": sample_s, "ratio": sample_s / base_s}

    naive_rows = [("klora naive per-step recompute", {})]
    if not args.skip_per_call:
        naive_rows.append(("klora official naive per-call recompute", {"mode": "official"}))
    for label, options in naive_rows:
        hook = NaiveKLoraHook(pipe, content, style, **options)
        sample_s = timed_sample(pipe, args, [hook])
        rows.append([label, 0.0, sample_s, sample_s / base_s])
        figures[label] = {"sample_s": sample_s, "ratio": sample_s / base_s}
    if "klora" in figures and "klora naive per-step recompute" in figures:
        figures["klora_speedup_over_naive_per_step"] = (
            figures["klora naive per-step recompute"]["sample_s"] / figures["klora"]["sample_s"]
        )

    print(f"\n{args.base}, {args.steps} steps, CFG 7.5, median of {args.repeats}, {args.threads} thread(s), "
          f"rank {args.rank} on {len(content.modules)} attention projections")  # fmt: skip
    print_table(["variant", "plan s", "sample s", "x base"], rows)
    write_result("fusion_speed", vars(args), figures)


if __name__ == "__main__":
    main()
