"""What does CRAFT's asymmetric CFG cost against plain CFG? Goal (issue 7): at most 1.10x.

Same base, prompts, steps, seed and guidance scale for every row, in one run. Rows:
    cfg             plain CFG on the base, no LoRA: the reference
    cfg + fused     plain CFG with both LoRAs merged into the weights (what a static merge costs: ~ the base)
    acfg merged     CRAFT's ACFG, rows [uncond | cond] as two half-batch passes on merged weights (default)
    acfg peft       CRAFT's ACFG with peft's per-sample adapters (the earlier path; gather/scatter per layer)
Both ACFG rows run the two branches as ONE batched forward of 2B rows per step. The images of the two ACFG
rows are compared (max |difference|, pixels in [0, 1]): they must agree up to float rounding.

LoRAs: the world's CRAFT LoRAs (`train.world_personalize`, trained once and cached under --work-dir, ~1.5 min), or
`--loras random` (random rank-16 factors on the same layer sets, no training).
Timing: `benchmarks.timing.interleaved` (rows interleaved per round, a warm-up round dropped); "x cfg" is the
median over rounds of row time / cfg time in the same round, with its interquartile range; the goal is judged on
wall time. "CPU-time x cfg" is the same ratio of process CPU seconds (robust to other jobs on a shared machine; equal
to wall time at --threads 1 on an idle one).

    python -m benchmarks.acfg_speed [--steps 30] [--repeats 7] [--prompts 4] [--threads 1] [--loras world]
    python -m benchmarks.acfg_speed --smoke     # 8 steps, 2 repeats, 2 prompts, random LoRAs
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from benchmarks.common import print_table, write_result
from benchmarks.timing import interleaved, ratios, spread
from lorafuse.fusion.registry import get_method, make_config
from lorafuse.fusion.sampling import sample
from lorafuse.models.load import load_base_pipeline

PROMPTS = [
    "a sks teapot in sks style",
    "a photo of a sks teapot, in sks style",
    "a sks teapot",
    "a sks style",
]
GUIDANCE = 4.0  # the world model's usual scale (demo, base_model_quality)
GOAL = 1.10


def world_loras(pipe, args):
    from lorafuse.lora.io import load_lora
    from lorafuse.train.world_personalize import style_recipe, subject_recipe, train_world_lora

    if args.loras == "world":
        c = train_world_lora(subject_recipe("teapot_08", layers="craft"), args.work_dir, progress=False)
        s = train_world_lora(style_recipe("crayon", layers="craft"), args.work_dir, progress=False)
        return load_lora(c, base=pipe), load_lora(s, base=pipe)
    from lorafuse.fusion.synthetic import random_lora
    from lorafuse.lora.presets import resolve_layers

    def on(preset):
        paths = set(resolve_layers(pipe, preset))
        return lambda ref: ref.component == "unet" and ref.path in paths

    return (random_lora(pipe, seed=1, rank=16, keep=on("craft_content")),
            random_lora(pipe, seed=2, rank=16, keep=on("craft_style")))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--prompts", type=int, default=4, help=f"batch size B (1..{len(PROMPTS)})")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--loras", choices=("world", "random"), default="world")
    ap.add_argument("--work-dir", default="out/craft_bench")
    ap.add_argument("--smoke", action="store_true", help="8 steps, 2 repeats, 2 prompts, random LoRAs")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.repeats, args.prompts, args.loras = 8, 2, 2, "random"
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    pipe = load_base_pipeline("world")
    content, style = world_loras(pipe, args)
    prompts = PROMPTS[: args.prompts]
    craft = get_method("craft")
    last: dict[str, np.ndarray] = {}
    # process CPU time beside wall time: on a shared machine other jobs stretch wall time, not our CPU seconds
    cpu: dict[str, list[float]] = {"cfg": [], "cfg + fused": [], "acfg merged": [], "acfg peft": []}

    def timed(label, make_plan=None):
        def run() -> float:
            plan = make_plan() if make_plan else None  # plan time (inject, merge) stays outside the timing
            try:
                guidance = plan.guidance(GUIDANCE) if plan else GUIDANCE
                t, c = time.perf_counter(), time.process_time()
                out = sample(pipe, prompts, steps=args.steps, guidance=guidance, seed=0, hooks=plan.hooks if plan
                             else (), progress=False)  # fmt: skip
                seconds = time.perf_counter() - t
                cpu[label].append(time.process_time() - c)
            finally:
                if plan:
                    plan.close()
            last[label] = np.asarray(out.images)
            return seconds

        return run

    runs = {
        "cfg": timed("cfg"),
        "cfg + fused": timed("cfg + fused", lambda: get_method("direct")().plan(pipe, content, style,
                                                                               make_config("direct"))),
        "acfg merged": timed("acfg merged", lambda: craft().plan(pipe, content, style,
                                                                make_config("craft", acfg_mechanism="merged"))),
        "acfg peft": timed("acfg peft", lambda: craft().plan(pipe, content, style,
                                                            make_config("craft", acfg_mechanism="peft"))),
    }  # fmt: skip
    times = interleaved(runs, args.repeats, on_round=lambda r: print(f"round {r + 1} done", flush=True))
    rel = ratios(times, "cfg")
    cpu_rel = ratios({k: v[-args.repeats :] for k, v in cpu.items()}, "cfg")  # the warm-up round dropped
    figures: dict = {"goal_x_cfg": GOAL, "rows": {}}
    rows = []
    for label in runs:
        s, r, rc = spread(times[label]), spread(rel[label]), spread(cpu_rel[label])
        figures["rows"][label] = {"sample_s": s, "x_cfg": r, "cpu_x_cfg": rc}
        rows.append([label, s["median"], r["median"], f"[{r['q25']:.3f}, {r['q75']:.3f}]", rc["median"]])
    diff = float(np.abs(last["acfg merged"] - last["acfg peft"]).max())
    effect = float(np.abs(last["acfg peft"] - last["cfg"]).max())
    figures["max_abs_image_diff_merged_vs_peft"] = diff
    figures["max_abs_image_diff_acfg_vs_cfg"] = effect  # the LoRAs' effect, for scale
    acfg = figures["rows"]["acfg merged"]["x_cfg"]
    figures["goal_met"] = bool(acfg["q75"] <= GOAL)  # met only if the upper quartile is within the goal
    print(f"\nworld base, {args.steps} steps, B={len(prompts)}, CFG {GUIDANCE}, {args.repeats} rounds, "
          f"{args.threads} thread(s), LoRAs: {args.loras}")  # fmt: skip
    print_table(["row", "sample s (median)", "x cfg (median)", "x cfg IQR", "CPU-time x cfg"], rows)
    print(f"images, acfg merged vs peft: max |diff| {diff:.2e} (LoRA effect vs cfg {effect:.3f}); "
          f"goal <= {GOAL}x: {'met' if figures['goal_met'] else 'NOT met'}")  # fmt: skip
    write_result("acfg_speed" + ("_smoke" if args.smoke else ""), vars(args), figures)


if __name__ == "__main__":
    main()
