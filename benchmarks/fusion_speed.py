"""How much does each fusion method cost at sampling time, relative to the base model with no LoRA?

Same prompt, steps and seed for every row, in one run. Besides every registered method (default options), K-LoRA
is measured in its variants and against a faithful per-step-recompute implementation
(`benchmarks.klora_reference.NaiveKLoraHook`: ΔW = s B A, |ΔW|, Top-K and γ recomputed at every step, as the official
code does; "per call" recomputes at every projection call, which is exactly the official code's cost).
LoRAs: random, on every UNet attention projection (what K-LoRA chooses between), rank --rank.

ZipLoRA: its mergers are learned once, up front, on two world renders as references (merge time, steps taken,
whether its early stop fired: `benchmarks.ziplora_cost` measures that on trained world LoRAs); the timed row is
sampling with the learned mergers fused, as a user samples after the merge.

Timing (`benchmarks.timing`): every row runs once per round, rows interleaved (base, direct, klora, ..., base,
direct, ...), one warm-up round dropped, --repeats rounds kept. A row's plan (inject, fuse, precompute) is timed
apart from its sampling. "x base" is the median over rounds of (row time / base time in the same round), with
its interquartile range: a goal such as 1.02x is met only if the IQR says the difference is not noise.

On FLUX.1 (`--base flux-tiny`) the LoRAs cover the transformer's attention projections (double and single
blocks), guidance defaults to the family's (1.0: no true CFG; dev's embedded guidance 3.5), and methods the family
refuses (B-LoRA) are listed as skipped.

    python -m benchmarks.fusion_speed [--base world-random|flux-tiny] [--steps 20] [--repeats 15] [--rank 8]
        [--threads 1] [--guidance G] [--zip-steps 100] [--skip-per-call] [--smoke]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch

from benchmarks.common import print_table, write_result
from benchmarks.klora_reference import NaiveKLoraHook
from benchmarks.timing import interleaved, ratios, spread
from lorafuse.errors import UserInputError
from lorafuse.eval.metrics import world_references
from lorafuse.families import family_of
from lorafuse.fusion.registry import get_method, make_config, method_names
from lorafuse.fusion.sampling import sample
from lorafuse.fusion.synthetic import random_lora
from lorafuse.fusion.ziplora import encode_reference, train_ziplora
from lorafuse.models.load import load_base_pipeline

PROMPT = "a red car in the city"
ZIP_REFS = (("teapot_08", "a photo of a sks teapot, in flat color style"), ("crayon", "a photo of a red mug, in sks style"))


def learn_zip_mergers(pipe, content, style, max_steps: int) -> tuple[object, dict]:
    """ZipLoRA's merge, once: world renders of a held-out individual and style as the two references."""
    (individual, c_prompt), (style_name, s_prompt) = ZIP_REFS
    t = time.perf_counter()
    c_ref = encode_reference(pipe, world_references(individual=individual, count=1)[0], c_prompt)
    s_ref = encode_reference(pipe, world_references(style=style_name, count=1)[0], s_prompt)
    mergers, report = train_ziplora(pipe, content, style, c_ref, s_ref, max_steps=max_steps)
    info = {"merge_s": time.perf_counter() - t, "train_s": report.seconds, "steps": report.steps,
            "converged": report.converged, "final_similarity": report.similarity[-1], "max_steps": max_steps}  # fmt: skip
    return mergers, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="world-random")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=15, help="kept rounds (one more warm-up round is dropped)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--guidance", type=float, help="CFG scale (default: 7.5 on SD bases, 1.0 on FLUX.1)")
    ap.add_argument("--zip-steps", type=int, default=100, help="ZipLoRA's max merger steps (its default)")
    ap.add_argument(
        "--skip-per-call", action="store_true", help="skip the slowest row (official per-call recompute)"
    )
    ap.add_argument("--smoke", action="store_true", help="3 steps, 2 rounds, 3 ZipLoRA steps: checks only")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.repeats, args.zip_steps = 3, 2, 3
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    pipe = load_base_pipeline(args.base)
    family = family_of(pipe)
    guidance = args.guidance if args.guidance is not None else (7.5 if family.default_guidance > 1 else 1.0)
    content = random_lora(pipe, seed=1, rank=args.rank, scale=0.1)
    style = random_lora(pipe, seed=2, rank=args.rank, scale=0.1)
    mergers, zip_info = learn_zip_mergers(pipe, content, style, args.zip_steps)

    refused = [m for m in method_names() if m in family.refused]
    for m in refused:
        print(f"skipped {m}: {family.refused[m]}")
    variants: list[tuple[str, str, dict]] = [(m, m, {}) for m in method_names() if m not in refused]
    variants = [(f"{m} (fused, learned mergers)" if m == "ziplora" else label, m, opts) for label, m, opts in variants]
    variants += [
        ("klora mechanism=adapter", "klora", {"mechanism": "adapter"}),
        ("klora official", "klora", {"klora_mode": "official"}),
        ("klora mechanism=inplace", "klora", {"mechanism": "inplace"}),
        ("switch mechanism=adapter", "switch", {"mechanism": "adapter"}),
        ("switch mechanism=inplace", "switch", {"mechanism": "inplace"}),
        ("composite mechanism=adapter", "composite", {"mechanism": "adapter"}),
    ]
    plan_times: dict[str, list[float]] = {}

    def timed_sample(hooks=(), guidance=guidance) -> float:
        t = time.perf_counter()
        sample(pipe, PROMPT, steps=args.steps, seed=0, guidance=guidance, hooks=hooks, progress=False)
        return time.perf_counter() - t

    def method_run(label: str, method: str, options: dict) -> Callable[[], float]:
        if method == "ziplora":
            options = {**options, "mergers": mergers}  # the merge is done; the plan only fuses
        # planned as `lorafuse fuse` plans: the method sees the prompt first (SSR-Merge calibrates on it)
        _, config = get_method(method).prepare_prompt(PROMPT, make_config(method, **options))

        def run() -> float:
            t = time.perf_counter()
            plan = get_method(method)().plan(pipe, content, style, config)
            plan_times.setdefault(label, []).append(time.perf_counter() - t)
            try:
                return timed_sample(plan.hooks, plan.guidance(guidance))
            finally:
                plan.close()  # the base is restored before the next row runs

        return run

    runs: dict[str, Callable[[], float]] = {"base (no LoRA)": timed_sample}
    for label, method, options in variants:
        try:
            runs[label] = method_run(label, method, options)
        except UserInputError as e:
            print(f"skipped {label}: {e}")
    naive_rows = [("klora naive per-step recompute", {})]
    if not args.skip_per_call:
        naive_rows.append(("klora official naive per-call recompute", {"mode": "official"}))
    for label, options in naive_rows:
        hook = NaiveKLoraHook(pipe, content, style, **options)
        runs[label] = lambda hook=hook: timed_sample([hook])

    def progress(r: int) -> None:
        print(f"round {r + 1}/{args.repeats + 1}{' (warm-up)' if r == 0 else ''} done", flush=True)

    times = interleaved(runs, repeats=args.repeats, warmup=1, on_round=progress)
    per_round = ratios(times, "base (no LoRA)")

    rows, figures = [], {"ziplora_merge": zip_info}
    for label in runs:
        s, x = spread(times[label]), spread(per_round[label])
        plan_s = spread(plan_times.get(label, []))["median"] if label in plan_times else 0.0
        rows.append([label, plan_s, s["median"], s["iqr"], x["median"], f"{x['q25']:.3f}-{x['q75']:.3f}"])
        figures[label] = {"plan_s": plan_s, "sample_s": s, "ratio": x, "sample_s_all": times[label]}
    if "klora" in times:
        naive = "klora naive per-step recompute"
        figures["klora_speedup_over_naive_per_step"] = spread(
            [n / k for n, k in zip(times[naive], times["klora"], strict=True)]
        )

    print(f"\n{args.base}, {args.steps} steps, CFG {guidance:g}, {args.repeats} interleaved rounds (+1 warm-up), "
          f"{args.threads} thread(s), rank {args.rank} on {len(content.modules)} attention projections")  # fmt: skip
    print_table(["variant", "plan s", "sample s (median)", "IQR s", "x base (median)", "x base IQR"], rows)
    print(f"ZipLoRA merge (random LoRAs): {zip_info['merge_s']:.1f} s, {zip_info['steps']} steps, "
          f"early stop {'fired' if zip_info['converged'] else 'not reached'}")
    name = "fusion_speed" if args.base in ("world", "world-random") else f"fusion_speed_{args.base}"
    write_result(f"{name}_smoke" if args.smoke else name, vars(args), figures)


if __name__ == "__main__":
    main()
