"""What do the fusion methods cost at the real model sizes? SD1.5, SDXL and FLUX.1 side by side, in one run.

Models: random weights from the released configs (`lorafuse.families`: sd15, sdxl, flux), nothing downloaded. Widths
are real everywhere; so a 2-core CPU run finishes, some things are reduced, and the table says which:
    sd15   the full UNet (0.86 B parameters)
    sdxl   transformer_layers_per_block (1, 2, 2) instead of (1, 2, 10): 0.90 B of 2.57 B parameters
    flux   1 double + 2 single blocks instead of 19 + 38 (0.69 B of 11.9 B), T5-XXL with 1 of 24 layers,
           64 T5 tokens instead of 512
    all    --size px images (default 256) instead of 512 / 1024; latents only (no VAE decode); float32
Every block kind is present, so per-layer costs (a switch, a low-rank product) are the real ones; the ratios of a
full-depth model are the same if each block's share of the time is (they are stacks of the same blocks).

Rows, per base (LoRAs: random rank --rank factors on the attention projections; CRAFT's on its content / style
layer presets; timing `benchmarks.timing.interleaved`: rows interleaved per round, one warm-up round dropped):
    base           plain sampling: CFG --cfg on SD; FLUX dev without true CFG (embedded guidance 3.5)
    base + CFG     FLUX only: true CFG --cfg with a negative prompt (what CRAFT's ACFG is compared with)
    direct, klora (mechanism auto / inplace), switch (auto / inplace), craft (ACFG, the uncond half on the base)
Each plan samples --images images in a row (the base too): "x base" is the median over rounds of the last image's
time over the base's last image in the same round (its IQR beside it), what each further seed or prompt costs;
"1st image" is the same ratio for a plan's first image, which also pays what a mechanism does once per plan
(ACFG's merges of W + ω ΔW, "inplace"'s first switches from the base). Goals: K-LoRA <= 1.05x base, ACFG <= 1.10x
plain CFG.

Memory. "held MB": resident memory the plan adds (RSS after plan() minus before, after gc; a CPU run, so weights
and copies are in the same RAM). "extra GB at full size": `fusion.variants.mechanism_bytes` from the parameter
counts of the full-size architectures (meta device), bf16 weights, float32 LoRA factors, two LoRAs on every
attention projection at rank --rank: what each mechanism needs beyond the model, on the device and on the host.

    OMP_NUM_THREADS=1 python -m benchmarks.realsize [--bases sd15 sdxl flux] [--size 256] [--steps 4]
        [--repeats 3] [--rank 16] [--threads 1] [--images 2] [--quick]
    python -m benchmarks.realsize --smoke     # memory table + one base at 64 px, 2 steps, 1 round
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
import warnings
from pathlib import Path

import psutil
import torch

from benchmarks.common import print_table, write_result
from benchmarks.timing import interleaved, ratios, spread
from lorafuse.families import flux as flux_family
from lorafuse.families import get_family
from lorafuse.families import sd15 as sd15_family
from lorafuse.families import sdxl as sdxl_family
from lorafuse.fusion.common import is_attention_projection
from lorafuse.fusion.registry import get_method, make_config
from lorafuse.fusion.sampling import sample
from lorafuse.fusion.synthetic import random_lora
from lorafuse.fusion.variants import mechanism_bytes
from lorafuse.lora.presets import resolve_layers
from lorafuse.lora.targets import base_modules
from lorafuse.models.tiny import TINY_WORDS
from lorafuse.models.tokenizer import build_clip_tokenizer, build_t5_tokenizer

PROMPT, NEGATIVE = "a photo of sks dog in watercolor style", "blurry"
REDUCED = {
    "sd15": "full UNet",
    "sdxl": "transformer_layers_per_block (1, 2, 2) of (1, 2, 10)",
    "flux": "1 + 2 of 19 + 38 blocks, T5 1 of 24 layers, 64 T5 tokens",
}
GOALS = {"klora": 1.05, "craft": 1.10}


def _clip_tokenizer(tmp: Path, name: str, pad: str = "<|endoftext|>"):
    return build_clip_tokenizer(TINY_WORDS, tmp / name, pad_token=pad)


def _clip(config: dict, tokenizer, cls_name: str = "CLIPTextModel"):
    import transformers

    ids = {f"{t}_token_id": getattr(tokenizer, f"{t}_token_id") for t in ("eos", "bos", "pad")}
    return getattr(transformers, cls_name)(transformers.CLIPTextConfig(**config, **ids))  # real vocabulary size


def build(name: str):
    """A random-weight pipeline of family `name` at real width (reduced as REDUCED says), eval mode, float32."""
    import diffusers

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="lorafuse-realsize-"))
    if name == "flux":
        import transformers

        tok = _clip_tokenizer(tmp, "clip")
        t5 = transformers.T5EncoderModel(transformers.T5Config(**{**flux_family.T5_XXL, "num_layers": 1}))
        pipe = diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**flux_family.SCHEDULER_DEV),
            vae=diffusers.AutoencoderKL(**flux_family.VAE),
            text_encoder=_clip(sd15_family.CLIP_L, tok), tokenizer=tok, text_encoder_2=t5, tokenizer_2=build_t5_tokenizer(TINY_WORDS, model_max_length=64),
            transformer=diffusers.FluxTransformer2DModel(
                **{**flux_family.TRANSFORMER, "num_layers": 1, "num_single_layers": 2}
            ),
        )  # fmt: skip
    else:
        scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip
        vae = diffusers.AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                      down_block_types=["DownEncoderBlock2D"] * 4,
                                      up_block_types=["UpDecoderBlock2D"] * 4)  # fmt: skip
        tok = _clip_tokenizer(tmp, "clip")
        if name == "sd15":
            pipe = diffusers.StableDiffusionPipeline(
                vae=vae, text_encoder=_clip(sd15_family.CLIP_L, tok), tokenizer=tok,
                unet=diffusers.UNet2DConditionModel(**sd15_family.UNET), scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )  # fmt: skip
        else:
            unet = diffusers.UNet2DConditionModel(**{**sdxl_family.UNET, "transformer_layers_per_block": [1, 2, 2]})
            tok2 = _clip_tokenizer(tmp, "clip2", pad="!")
            pipe = diffusers.StableDiffusionXLPipeline(
                vae=vae, text_encoder=_clip(sd15_family.CLIP_L, tok), tokenizer=tok,
                text_encoder_2=_clip(sdxl_family.CLIP_BIGG, tok2, "CLIPTextModelWithProjection"),
                tokenizer_2=tok2, unet=unet, scheduler=scheduler,
                force_zeros_for_empty_prompt=True, add_watermarker=False,
            )  # fmt: skip
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def full_size_bytes(rank: int) -> dict[str, dict[str, dict[str, float]]]:
    """GB each mechanism needs beyond the model, at the full released sizes (meta device: no weights)."""
    out = {}
    for name in ("sd15", "sdxl", "flux"):
        family = get_family(name)
        base = base_modules(family.reference_components())
        shapes = [ref.shape for ref in base.modules.values() if is_attention_projection(ref)]
        counts = mechanism_bytes(shapes, [(rank, rank)] * len(shapes), weight_bytes=2)
        denoiser = sum(
            p.numel() for p in family.reference_components()[family.denoiser_component].parameters()
        )
        out[name] = {"denoiser_params_b": denoiser / 1e9, "switched_layers": len(shapes),
                     **{m: {k: v / 1e9 for k, v in b.items()} for m, b in counts.items()}}  # fmt: skip
    return out


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _loras(pipe, rank: int):
    content = random_lora(pipe, seed=1, rank=rank, scale=0.02)
    style = random_lora(pipe, seed=2, rank=rank, scale=0.02)
    craft = []
    for preset, seed in (("craft_content", 3), ("craft_style", 4)):
        paths = set(resolve_layers(pipe, preset))
        keep = lambda ref, paths=paths: is_attention_projection(ref) and ref.path in paths  # noqa: E731
        craft.append(random_lora(pipe, seed=seed, rank=rank, scale=0.02, keep=keep))
    return content, style, craft


def measure(name: str, args) -> dict:
    t0 = time.perf_counter()
    pipe = build(name)
    family = get_family(name)
    built_s = time.perf_counter() - t0
    content, style, (craft_c, craft_s) = _loras(pipe, args.rank)
    flux = family.objective == "flow"
    base_guidance = 1.0 if flux else args.cfg  # FLUX dev: no true CFG by default
    common = dict(steps=args.steps, seed=0, height=args.size, width=args.size, output="latent", progress=False)
    held: dict[str, float] = {}
    first: dict[str, list[float]] = {}  # label -> the first image's seconds per kept round (warm-up included)

    def images(label: str, one_image) -> float:
        """`args.images` images in a row; the last one's seconds go to the ratio, the first one's to `first`:
        a plan's first image also pays what the mechanism does once (ACFG's merges, inplace's first switches)."""
        seconds = [_timed(one_image) for _ in range(args.images)]
        first.setdefault(label, []).append(seconds[0])
        return seconds[-1]

    def plain(label: str, guidance: float, negative: str | None = None):
        return lambda: images(label, lambda: sample(pipe, PROMPT, negative_prompt=negative, guidance=guidance,
                                                    **common))  # fmt: skip

    def method(label: str, m: str, c, s, guidance: float, negative: str | None = None, **options):
        config = make_config(m, **options)

        def run() -> float:
            before = _rss()
            plan = get_method(m)().plan(pipe, c, s, config)
            held[label] = max(held.get(label, 0.0), (_rss() - before) / 1e6)
            try:
                return images(label, lambda: sample(pipe, PROMPT, negative_prompt=negative, hooks=plan.hooks,
                                                    guidance=plan.guidance(guidance), **common))  # fmt: skip
            finally:
                plan.close()

        return run

    runs = {"base": plain("base", base_guidance)}
    if flux:
        runs["base + CFG"] = plain("base + CFG", args.cfg, NEGATIVE)
    if not args.quick:
        runs["direct"] = method("direct", "direct", content, style, base_guidance)
    for mech in ("auto", "inplace"):
        runs[f"klora {mech}"] = method(f"klora {mech}", "klora", content, style, base_guidance, mechanism=mech)
        if not args.quick:
            runs[f"switch {mech}"] = method(f"switch {mech}", "switch", content, style, base_guidance,
                                            mechanism=mech)  # fmt: skip
    runs["craft (ACFG)"] = method("craft (ACFG)", "craft", craft_c, craft_s, args.cfg, NEGATIVE if flux else None)
    load_before = os.getloadavg()[0]
    times = interleaved(runs, repeats=args.repeats, warmup=1,
                        on_round=lambda r: print(f"  {name}: round {r + 1}/{args.repeats + 1}", flush=True))  # fmt: skip
    first = {label: seconds[1:] for label, seconds in first.items()}  # drop the warm-up round, as interleaved does
    cfg_ref = "base + CFG" if flux else "base"
    per_ref = {ref: (ratios(times, ref), ratios(first, ref)) for ref in {"base", cfg_ref}}
    rows = {}
    for label in runs:
        ref = cfg_ref if label.startswith("craft") else "base"
        next_image, first_image = per_ref[ref]
        rows[label] = {"sample_s": spread(times[label]), "ratio": spread(next_image[label]),
                       "first_s": spread(first[label]), "first_ratio": spread(first_image[label]),
                       "over": ref, "held_mb": held.get(label)}  # fmt: skip
    n_params = sum(p.numel() for p in family.denoiser(pipe).parameters())
    result = {"reduced": REDUCED[name], "denoiser_params_b": n_params / 1e9, "build_s": built_s, "rows": rows,
              "cfg": args.cfg, "base_guidance": base_guidance, "load_avg": [load_before, os.getloadavg()[0]]}  # fmt: skip
    return result  # the pipeline goes with this frame; main() collects before the next base


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bases", nargs="+", default=["sd15", "sdxl", "flux"], choices=["sd15", "sdxl", "flux"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--cfg", type=float, default=5.0, help="CFG scale (true CFG on FLUX.1)")
    # 1 thread by default: on a shared 2-core machine, 2 OpenMP threads make every op wait for a descheduled
    # sibling at its barrier; that once made one base sampling 2.5x slower than the next in the same process
    # (56 s vs 22 s at 64 px) and swamped every ratio. One thread per process is what the ratios need.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=2,
                    help="images per plan; the ratio is the last one's (a user sampling seeds pays that per image)")
    ap.add_argument("--quick", action="store_true", help="only the goal rows: base, CFG, K-LoRA, CRAFT")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.bases, args.size, args.steps, args.repeats = args.bases[:1], 64, 2, 1
    if args.images < 1:
        ap.error("--images must be >= 1")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    full = full_size_bytes(args.rank)
    print(f"Extra GB per mechanism at full size (bf16 weights, two rank-{args.rank} LoRAs on every attention "
          "projection): device / host")  # fmt: skip
    print_table(
        ["base", "params B", "layers", "swap", "adapter", "inplace"],
        [[n, f"{f['denoiser_params_b']:.2f}", f["switched_layers"],
          *(f"{f[m]['device']:.2f} / {f[m]['host']:.2f}" for m in ("swap", "adapter", "inplace"))]
         for n, f in full.items()],
    )  # fmt: skip

    results = {}
    for name in args.bases:
        print(f"\n{name} ({REDUCED[name]}), {args.size} px, {args.steps} steps, {args.repeats} rounds", flush=True)
        results[name] = measure(name, args)
        gc.collect()
    labels = list(dict.fromkeys(label for r in results.values() for label in r["rows"]))
    header = ["row", *(f"{n} x base (IQR)" for n in results), *(f"{n} 1st image" for n in results),
              *(f"{n} held MB" for n in results)]  # fmt: skip
    table = []
    for label in labels:
        cells, firsts, mem = [], [], []
        for r in results.values():
            row = r["rows"].get(label)
            if row is None:
                cells.append("-")
                firsts.append("-")
                mem.append("-")
                continue
            x = row["ratio"]
            vs = " vs CFG" if label.startswith("craft") else ""
            cells.append(f"{x['median']:.3f} ({x['q25']:.2f}-{x['q75']:.2f}){vs}")
            firsts.append(f"{row['first_ratio']['median']:.3f}")
            mem.append("-" if row["held_mb"] is None else f"{row['held_mb']:.0f}")
        table.append([label, *cells, *firsts, *mem])
    print(f"\nsampling time over the base's, image {args.images} of a plan (1st image: a plan's first, which also "
          f"pays what a mechanism does once), {args.threads} thread(s); goals: K-LoRA <= {GOALS['klora']}x base, "
          f"ACFG <= {GOALS['craft']}x plain CFG")  # fmt: skip
    print_table(header, table)
    for name, r in results.items():
        base_s = r["rows"]["base"]["sample_s"]["median"]
        print(f"  {name}: {r['denoiser_params_b']:.2f} B denoiser parameters, base {base_s:.1f} s per image")
    write_result("realsize_smoke" if args.smoke else "realsize", vars(args), {"full_size": full, "bases": results})


if __name__ == "__main__":
    main()
