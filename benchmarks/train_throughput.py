"""How fast and how big is lorafuse's LoRA trainer next to the plain diffusers example loop?

Same random-weight base, same kohya-folder data, same settings (UNet attention LoRA to_q/k/v/out.0 of rank r,
AdamW, constant LR, batch B, fp32, clipping at 1.0). Three trainers, each in its own subprocess so peak memory
(max RSS, `resource.getrusage`) is its own:
  - diffusers_example: a minimal re-implementation of diffusers' examples/text_to_image/train_text_to_image_lora.py
    loop (train_text_to_image_lora_sdxl.py for SDXL: both text encoders, size/crop time ids), with peft
    `unet.add_adapter`, VAE and text encoders run every step, no caches, written out below;
  - lorafuse: `train_lora` with the same settings and no caches;
  - lorafuse_cached: `train_lora` with cache_latents and cache_text_encoder_outputs.
it/s is optimizer steps per second after the first step (start-up and the first step's one-off costs excluded),
measured the same way in every trainer from per-step wall-clock stamps.

    OMP_NUM_THREADS=1 python -m benchmarks.train_throughput [--steps 30] [--batch 4] [--rank 4] [--rounds 5]
                                                           [--base world-random|sd15|sdxl] [--size PX] [--smoke]

Bases: "world-random" (the built-in world architecture, 64 px, the default) or random weights of the released
SD1.5 and SDXL configs at real width, built by `benchmarks.realsize.build` (SDXL with transformer depth
(1, 2, 2) of (1, 2, 10); nothing downloaded) and saved once to a temporary diffusers folder that both trainers
load; train them at a reduced --size (default 128 px) so a CPU run finishes. Results: results/train_throughput.json
(world-random), results/train_throughput_{base}_{size}px.json. The example's rows also time its VAE encoder and
text encoders per step: the share of its step that caching skips.

Rounds interleave the trainers (the order rotates every round) so that load from other processes on a shared
machine falls on all of them alike; each figure is the median over rounds, and a "vs example" ratio is the median
of the per-round ratios.

Peak RSS is the whole child process's, so it includes lorafuse's end-of-run loss plot (matplotlib, about 30 MB
of RSS on its own; the trainer hands the model's freed pages back to the OS before drawing it) and the caching
pass; "lorafuse_cached" vs "diffusers_example" is the comparison the goal is about (caches are lorafuse features
the example does not have), "lorafuse" shows the loop alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAINERS = ("diffusers_example", "lorafuse", "lorafuse_cached")
BASES = ("world-random", "sd15", "sdxl")
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the example script's target_modules


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")


def _example_pipeline(folder: Path | None):
    if folder is None:
        from lorafuse.models.load import world_random_pipeline

        return world_random_pipeline()
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder, local_files_only=True)


def _example_text(pipe, size: int):
    """The example's per-step text conditioning: tokenize(caption) -> ids, and ids -> the UNet's text inputs.
    SD: the final hidden state of the one encoder. SDXL (train_text_to_image_lora_sdxl.py `encode_prompt`): the
    penultimate hidden states of both encoders side by side, the second's pooled projection, and the size/crop
    time ids (original size, crop top-left, target size)."""
    import torch

    def ids(tokenizer, caption: str):
        return tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids[0]  # fmt: skip

    if getattr(pipe, "text_encoder_2", None) is None:
        te = pipe.text_encoder
        return (lambda caption: [ids(pipe.tokenizer, caption)],
                lambda batch: (te(batch["input_ids"][0], return_dict=False)[0], {}))  # fmt: skip
    tokenizers, encoders = (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)

    def encode(batch):
        states = []
        for te, input_ids in zip(encoders, batch["input_ids"], strict=True):
            out = te(input_ids, output_hidden_states=True, return_dict=False)
            pooled, states = out[0], [*states, out[-1][-2]]
        time_ids = torch.tensor([[*o, *c, size, size] for o, c in batch["sizes"]], dtype=pooled.dtype)
        return torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}

    return lambda caption: [ids(t, caption) for t in tokenizers], encode


def run_diffusers_example(
    data: Path, steps: int, batch: int, rank: int, lr: float, seed: int, base: str, folder: Path | None, size: int
) -> dict:
    """diffusers' train_text_to_image_lora(_sdxl).py loop, minus hub datasets and torchvision (PIL does the
    transforms)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from PIL import Image

    torch.manual_seed(seed)
    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision="no")
    pipe = _example_pipeline(folder)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    vae, unet = pipe.vae, pipe.unet
    encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    tokenize, encode = _example_text(pipe, size)

    # the kohya folder as an image/caption list, repeats expanded (the example has no repeats: same epoch size)
    items = []
    for folder_ in sorted(p for p in data.iterdir() if p.is_dir() and p.name[0].isdigit()):
        repeats = int(folder_.name.split("_", 1)[0])
        for image in sorted(folder_.glob("*.png")):
            items += [(image, image.with_suffix(".txt").read_text().strip())] * repeats

    def example(i: int) -> dict:
        path, caption = items[i]
        img = Image.open(path).convert("RGB")
        original = (img.height, img.width)
        scale = size / min(img.size)  # transforms.Resize(resolution) + CenterCrop(resolution)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
        if np.random.rand() < 0.5:  # RandomHorizontalFlip
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        return {"pixel_values": pixels, "input_ids": tokenize(caption), "sizes": (original, (top, left))}

    def collate_fn(examples: list[dict]) -> dict:
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "input_ids": [torch.stack(ids) for ids in zip(*(e["input_ids"] for e in examples), strict=True)],
                "sizes": [e["sizes"] for e in examples]}  # fmt: skip

    dataloader = torch.utils.data.DataLoader(
        range(len(items)),
        shuffle=True,
        batch_size=batch,
        collate_fn=lambda idx: collate_fn([example(i) for i in idx]),
    )
    lr_scheduler = get_scheduler(
        "constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps
    )
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)

    stamps, losses, step, frozen = [], [], 0, []  # frozen: seconds in the VAE encoder and text encoders per step
    while step < steps:
        unet.train()
        for batch_ in dataloader:
            with accelerator.accumulate(unet):
                t0 = time.perf_counter()
                latents = vae.encode(batch_["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
                t1 = time.perf_counter()
                noise = torch.randn_like(latents)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)
                ).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                t2 = time.perf_counter()
                encoder_hidden_states, added = encode(batch_)
                frozen.append((t1 - t0, time.perf_counter() - t2))
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states,
                                  added_cond_kwargs=added or None, return_dict=False)[0]  # fmt: skip
                loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_layers, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                stamps.append(time.time())
                losses.append(loss.item())
                if step >= steps:
                    break
    vae_s, text_s = zip(*frozen[1:], strict=True) if len(frozen) > 1 else ((float("nan"),), (float("nan"),))
    return {"stamps": stamps, "losses": losses, "vae_s": statistics.median(vae_s), "text_s": statistics.median(text_s)}


def run_lorafuse(
    data: Path, steps: int, batch: int, rank: int, lr: float, seed: int, base: str, folder: Path | None, size: int,
    cached: bool, out: Path,
) -> dict:  # fmt: skip
    from lorafuse.train.config import load_train_config
    from lorafuse.train.loop import train_lora
    from lorafuse.train.run_log import read_rows

    overrides = {
        "model.pretrained_model_name_or_path": base if folder is None else str(folder),
        "dataset.train_data_dir": str(data),
        "dataset.resolution": str(size),
        "dataset.flip_aug": "true",
        "network.layers": "attn",
        "network.network_dim": str(rank),
        "network.network_alpha": str(rank),
        "network.network_train_unet_only": "true",
        "optimizer.learning_rate": str(lr),
        "optimizer.max_grad_norm": "1.0",
        "training.max_train_steps": str(steps),
        "training.train_batch_size": str(batch),
        "training.seed": str(seed),
        "training.output_dir": str(out),
        "training.logging": "csv",
    }
    if cached:
        overrides.update({"dataset.cache_latents": "true", "dataset.cache_text_encoder_outputs": "true"})
    started = time.time()
    result = train_lora(load_train_config(None, overrides), progress_bar=False)
    rows = read_rows(result.log_csv)
    return {"stamps": [started + r["seconds"] for r in rows], "losses": [r["loss"] for r in rows]}


def save_real_base(base: str, folder: Path) -> None:
    """Random weights of the released `base` config at real width (as benchmarks/realsize.py builds them) as a
    diffusers folder, so every trainer loads the same weights the same way."""
    import torch

    from benchmarks.realsize import build

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    build(base).save_pretrained(folder)  # both trainers take its DDIM config's forward process (DDPMScheduler)


def child(args: argparse.Namespace) -> None:
    if args.child == "build":
        save_real_base(args.base, Path(args.folder))
        return
    common = dict(
        data=Path(args.data), steps=args.steps, batch=args.batch, rank=args.rank, lr=args.lr, seed=args.seed,
        base=args.base, folder=Path(args.folder) if args.folder else None, size=args.size,
    )  # fmt: skip
    started = time.time()
    if args.child == "diffusers_example":
        res = run_diffusers_example(**common)
    else:
        with tempfile.TemporaryDirectory() as out:
            res = run_lorafuse(**common, cached=args.child == "lorafuse_cached", out=Path(out))
    print(
        json.dumps(
            {
                "it_s": _rate(res["stamps"]),
                "wall_s": time.time() - started,
                "max_rss_mb": _max_rss_mb(),
                "loss_first": res["losses"][0],
                "loss_last": res["losses"][-1],
                "steps": len(res["losses"]),
                **{k: res[k] for k in ("vae_s", "text_s") if k in res},
            }
        )
    )


def _child(args: argparse.Namespace, name: str, data: Path, folder: Path | None) -> dict | None:
    cmd = [sys.executable, "-m", "benchmarks.train_throughput", "--child", name, "--data", str(data)]
    cmd += [f"--{k}={getattr(args, k)}" for k in ("steps", "batch", "rank", "lr", "seed", "base", "size")]
    cmd += [] if folder is None else ["--folder", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) if name != "build" else None


def _rounds(args: argparse.Namespace, tmp: Path) -> dict[str, list[dict]]:
    from lorafuse.world.dataset import write_subject_dataset

    data, folder = tmp / "data", None if args.base == "world-random" else tmp / "base"
    write_subject_dataset("robot_09", data, n=args.images, repeats=args.repeats)
    if folder is not None:
        started = time.time()
        _child(args, "build", data, folder)
        print(f"built and saved the random-weight {args.base} base in {time.time() - started:.0f} s", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in args.trainers}
    for r in range(args.rounds):
        order = args.trainers[r % len(args.trainers) :] + args.trainers[: r % len(args.trainers)]
        for name in order:
            runs[name].append(_child(args, name, data, folder))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {runs[n][-1]['it_s']:.3f} it/s {runs[n][-1]['max_rss_mb']:.1f} MB" for n in order), flush=True)  # fmt: skip
    return runs


def _ratios(runs: dict[str, list[dict]], figures: dict[str, dict]) -> None:
    """Per-round ratios against the example (paired by round, so load drift cancels), medians into `figures`;
    and the share of the example's step spent in the frozen VAE encoder and text encoders, which caching skips
    (so 1 / (1 - share) is the speed-up skipping them alone gives)."""
    base = runs["diffusers_example"]
    shares = [(r["vae_s"] + r["text_s"]) * r["it_s"] for r in base]
    figures["example_frozen_share"] = f = {
        "vae_s": statistics.median(r["vae_s"] for r in base),
        "text_s": statistics.median(r["text_s"] for r in base),
        "step_s": statistics.median(1 / r["it_s"] for r in base),
        "share": statistics.median(shares),
        "skip_bound": statistics.median(1 / (1 - x) for x in shares),
    }
    print(f"diffusers_example per step: VAE encode {f['vae_s']:.2f} s, text encoders {f['text_s']:.2f} s of "
          f"{f['step_s']:.2f} s ({f['share']:.0%}); skipping them alone: {f['skip_bound']:.2f}x")  # fmt: skip
    for name in ("lorafuse", "lorafuse_cached"):
        if name not in runs:
            continue
        ratios = {
            k: [a[key] / b[key] for a, b in zip(runs[name], base, strict=True)]
            for k, key in (("it_s_ratio", "it_s"), ("max_rss_ratio", "max_rss_mb"))
        }
        figures[f"{name}_vs_example"] = f = {
            **{k: statistics.median(v) for k, v in ratios.items()},
            "max_rss_diff_mb": statistics.median(
                a["max_rss_mb"] - b["max_rss_mb"] for a, b in zip(runs[name], base, strict=True)
            ),
            "it_s_ratio_range": [min(ratios["it_s_ratio"]), max(ratios["it_s_ratio"])],
        }
        print(
            f"{name} / diffusers_example: {f['it_s_ratio']:.2f}x it/s (rounds "
            f"{f['it_s_ratio_range'][0]:.2f}-{f['it_s_ratio_range'][1]:.2f}), "
            f"{f['max_rss_ratio']:.3f}x peak RSS ({f['max_rss_diff_mb']:+.1f} MB)"
        )


def _reduced(base: str) -> str:
    from benchmarks.realsize import REDUCED

    return REDUCED[base]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; figures are medians")
    ap.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    ap.add_argument("--base", choices=BASES, default="world-random",
                    help="world-random, or random weights of the released SD1.5 / SDXL configs at real width")  # fmt: skip
    ap.add_argument("--size", type=int, help="training resolution in px (default: 64 on world-random, else 128)")
    ap.add_argument(
        "--smoke", action="store_true", help="8 steps of batch 2 on 2 images: checks, not figures"
    )
    ap.add_argument("--child", choices=(*TRAINERS, "build"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.size is None:
        args.size = 64 if args.base == "world-random" else 128
    if args.child:
        child(args)
        return
    if args.smoke:
        args.steps, args.batch, args.images, args.repeats, args.rounds = 8, 2, 2, 2, 1

    from benchmarks.common import print_table, write_result

    with tempfile.TemporaryDirectory() as tmp:
        runs = _rounds(args, Path(tmp))
    keys = ("it_s", "wall_s", "max_rss_mb", "loss_first", "loss_last", "steps")
    figures: dict[str, dict] = {
        n: {**{k: statistics.median(run[k] for run in rs) for k in keys}, "rounds": rs}
        for n, rs in runs.items()
    }
    header = ["trainer", "it/s", "wall s", "max RSS MB", "loss first", "loss last"]
    rows = [
        [n, f["it_s"], f["wall_s"], f["max_rss_mb"], f["loss_first"], f["loss_last"]]
        for n, f in figures.items()
    ]
    print_table(header, rows)
    if "diffusers_example" in runs:
        _ratios(runs, figures)
    config = {
        k: getattr(args, k) for k in ("steps", "batch", "rank", "lr", "seed", "images", "repeats", "rounds")
    }
    config.update(
        base=args.base,
        reduced=None if args.base == "world-random" else _reduced(args.base),
        resolution=args.size,
        layers="attn (to_q, to_k, to_v, to_out.0)",
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
    )
    config["smoke"] = args.smoke
    name = "train_throughput" if args.base == "world-random" else f"train_throughput_{args.base}_{args.size}px"
    write_result(f"{name}_smoke" if args.smoke else name, config, figures)


if __name__ == "__main__":
    main()
