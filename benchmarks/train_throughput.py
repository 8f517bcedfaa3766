"""How fast and how big is lorafuse's LoRA trainer next to the plain diffusers example loop?

Same random-weight world model, same kohya-folder data, same settings (UNet attention LoRA to_q/k/v/out.0 of
rank r, AdamW, constant LR, batch B, fp32, clipping at 1.0). Three trainers, each in its own subprocess so peak
memory (max RSS, `resource.getrusage`) is its own:
  - diffusers_example: a minimal re-implementation of diffusers' examples/text_to_image/train_text_to_image_lora.py
    loop (peft `unet.add_adapter`, VAE and text encoder run every step, no caches), written out below;
  - lorafuse: `train_lora` with the same settings and no caches;
  - lorafuse_cached: `train_lora` with cache_latents and cache_text_encoder_outputs.
it/s is optimizer steps per second after the first step (start-up and the first step's one-off costs excluded),
measured the same way in every trainer from per-step wall-clock stamps.

    OMP_NUM_THREADS=1 python -m benchmarks.train_throughput [--steps 30] [--batch 4] [--rank 4] [--rounds 5]
                                                           [--smoke]

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
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the example script's target_modules


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")


def run_diffusers_example(data: Path, steps: int, batch: int, rank: int, lr: float, seed: int) -> dict:
    """diffusers' train_text_to_image_lora.py loop, minus hub datasets and torchvision (PIL does the transforms)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from PIL import Image

    from lorafuse.models.load import world_random_pipeline

    torch.manual_seed(seed)
    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision="no")
    pipe = world_random_pipeline()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    # the kohya folder as an image/caption list, repeats expanded (the example has no repeats: same epoch size)
    items = []
    for folder in sorted(p for p in data.iterdir() if p.is_dir() and p.name[0].isdigit()):
        repeats = int(folder.name.split("_", 1)[0])
        for image in sorted(folder.glob("*.png")):
            items += [(image, image.with_suffix(".txt").read_text().strip())] * repeats
    size = vae.config.sample_size

    def example(i: int) -> dict:
        path, caption = items[i]
        img = Image.open(path).convert("RGB")
        scale = size / min(img.size)  # transforms.Resize(resolution) + CenterCrop(resolution)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
        if np.random.rand() < 0.5:  # RandomHorizontalFlip
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        ids = tokenizer(
            caption,
            max_length=tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]
        return {"pixel_values": pixels, "input_ids": ids}

    def collate_fn(examples: list[dict]) -> dict:
        return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}

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

    stamps, losses, step = [], [], 0
    while step < steps:
        unet.train()
        for batch_ in dataloader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch_["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)
                ).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch_["input_ids"], return_dict=False)[0]
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
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
    return {"stamps": stamps, "losses": losses}


def run_lorafuse(
    data: Path, steps: int, batch: int, rank: int, lr: float, seed: int, cached: bool, out: Path
) -> dict:
    from lorafuse.train.config import load_train_config
    from lorafuse.train.loop import train_lora
    from lorafuse.train.run_log import read_rows

    overrides = {
        "model.pretrained_model_name_or_path": "world-random",
        "dataset.train_data_dir": str(data),
        "dataset.resolution": "64",
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


def child(args: argparse.Namespace) -> None:
    common = dict(
        data=Path(args.data), steps=args.steps, batch=args.batch, rank=args.rank, lr=args.lr, seed=args.seed
    )
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
            }
        )
    )


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
    ap.add_argument(
        "--smoke", action="store_true", help="8 steps of batch 2 on 2 images: checks, not figures"
    )
    ap.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.smoke:
        args.steps, args.batch, args.images, args.repeats, args.rounds = 8, 2, 2, 2, 1

    from benchmarks.common import print_table, write_result
    from lorafuse.world.dataset import write_subject_dataset

    runs: dict[str, list[dict]] = {name: [] for name in args.trainers}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_subject_dataset("robot_09", data, n=args.images, repeats=args.repeats)
        for r in range(args.rounds):
            order = args.trainers[r % len(args.trainers) :] + args.trainers[: r % len(args.trainers)]
            for name in order:
                cmd = [
                    sys.executable,
                    "-m",
                    "benchmarks.train_throughput",
                    "--child",
                    name,
                    "--data",
                    str(data),
                ]
                cmd += [f"--{k}={getattr(args, k)}" for k in ("steps", "batch", "rank", "lr", "seed")]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
                runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(
                    f"{n} {runs[n][-1]['it_s']:.2f} it/s {runs[n][-1]['max_rss_mb']:.1f} MB" for n in order
                )
            )
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
        base = runs["diffusers_example"]
        for name in ("lorafuse", "lorafuse_cached"):
            if name in runs:
                ratios = {
                    k: [a[key] / b[key] for a, b in zip(runs[name], base, strict=True)]
                    for k, key in (("it_s_ratio", "it_s"), ("max_rss_ratio", "max_rss_mb"))
                }
                figures[f"{name}_vs_example"] = {
                    **{k: statistics.median(v) for k, v in ratios.items()},
                    "max_rss_diff_mb": statistics.median(
                        a["max_rss_mb"] - b["max_rss_mb"] for a, b in zip(runs[name], base, strict=True)
                    ),
                    "it_s_ratio_range": [min(ratios["it_s_ratio"]), max(ratios["it_s_ratio"])],
                }
                f = figures[f"{name}_vs_example"]
                print(
                    f"{name} / diffusers_example: {f['it_s_ratio']:.2f}x it/s (rounds "
                    f"{f['it_s_ratio_range'][0]:.2f}-{f['it_s_ratio_range'][1]:.2f}), "
                    f"{f['max_rss_ratio']:.3f}x peak RSS ({f['max_rss_diff_mb']:+.1f} MB)"
                )
    config = {
        k: getattr(args, k) for k in ("steps", "batch", "rank", "lr", "seed", "images", "repeats", "rounds")
    }
    config.update(
        base="world-random",
        resolution=64,
        layers="attn (to_q, to_k, to_v, to_out.0)",
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
    )
    config["smoke"] = args.smoke
    write_result("train_throughput_smoke" if args.smoke else "train_throughput", config, figures)


if __name__ == "__main__":
    main()
