"""Personalize the built-in world model: one call trains a subject or a style LoRA, from the world's own renders.

The demo, the fusion leaderboard and the CRAFT benchmarks all need "a content LoRA for teapot_08 (5 images)" and
"a style LoRA for crayon (1 image)". This module is that recipe, once: it writes the kohya-style dataset with
`world.dataset`, builds a `TrainConfig` (settings like `examples/world_*_lora.toml`'s) and runs the ordinary
trainer. Results are cached by recipe: the LoRA file's name carries a hash of every setting, so a second call with
the same recipe returns the file at once, and a changed setting trains anew beside it.

Layer sets: subject and style LoRAs default to `layers="all"` with LoCon 3x3 convs (see `subject_recipe` and
`style_recipe` for the measurements); `layers="attn"` is every attention projection (as K-LoRA's and ZipLoRA's
LoRAs); `layers="craft"` trains CRAFT-LoRA's disjoint sets (content LoRAs on `craft_content`, style LoRAs on
`craft_style`); any other preset name or regex tuple is passed through.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from lorafuse.errors import UserInputError
from lorafuse.world.catalog import HELD_OUT_STYLES, check_style, parse_individual

Kind = Literal["subject", "style"]


@dataclass(frozen=True)
class WorldLoraRecipe:
    """Every setting that decides the trained LoRA (the cache key)."""

    kind: Kind
    name: str  # an individual ('teapot_08') for a subject, a style ('crayon') for a style
    n_images: int = 0  # 0: the default, 5 for a subject and 1 for a style (the paper's one-shot style)
    repeats: int = 10
    epochs: int = 20
    batch: int = 5
    rank: int = 16
    alpha: float = 16.0
    conv_rank: int = 0  # > 0: also the 3x3 convs of the chosen layers (LoCon), needed for craft_style
    layers: str = "attn"
    learning_rate: float = 5e-4
    seed: int = 0
    base: str = "world"
    styles: tuple[str, ...] = ()  # a subject's dataset: image k in styles[k % len(styles)]; () for a style

    def __post_init__(self) -> None:
        object.__setattr__(self, "styles", tuple(self.styles))  # a list from JSON or TOML would not hash
        if self.kind == "subject":
            parse_individual(self.name)
            for style in self.styles:
                if check_style(style) in HELD_OUT_STYLES:
                    raise UserInputError(f"{style!r} is a held-out style: a subject dataset uses seen styles")
        elif self.kind == "style":
            check_style(self.name)
            if self.styles:
                raise UserInputError("styles: only a subject recipe renders its dataset in chosen styles")
        else:
            raise UserInputError(f"kind must be 'subject' or 'style', got {self.kind!r}")
        if self.n_images < 0 or self.repeats < 1 or self.epochs < 1 or self.batch < 1 or self.rank < 1:
            raise UserInputError(f"{self}: n_images >= 0, repeats, epochs, batch and rank >= 1")

    @property
    def images(self) -> int:
        return self.n_images or (5 if self.kind == "subject" else 1)

    @property
    def layer_preset(self) -> str:
        if self.layers == "craft":
            return "craft_content" if self.kind == "subject" else "craft_style"
        return self.layers

    def key(self) -> str:
        # the base's weights are part of the recipe: a retrained or fine-tuned base must not reuse old LoRAs
        settings = {**asdict(self), "base_weights": base_fingerprint(self.base)}
        if not self.styles:  # recipes from before the field existed keep their keys (and cached LoRAs)
            del settings["styles"]
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def stem(self) -> str:
        return f"{self.kind}_{self.name}_{self.layers}_{self.key()}"


@functools.lru_cache(maxsize=8)
def base_fingerprint(base: str) -> str:
    """A short hash of a base pipeline folder's weight and config files ('world' = the shipped folder)."""
    from lorafuse.models.world import default_base_path

    folder = default_base_path() if base == "world" else Path(base)
    if not folder.is_dir():  # another built-in name (e.g. world-random: fixed by its seed) or a single file
        target = folder if folder.is_file() else None
        return hashlib.sha256(target.read_bytes()).hexdigest()[:16] if target else base
    digest = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".txt"):
            digest.update(f.relative_to(folder).as_posix().encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


# Five different seen styles, none of the four the lora_learning benchmark prompts (flat, outlined, hatched,
# dotted), so that benchmark measures the subject in styles the LoRA never saw it in.
SUBJECT_STYLES = ("striped", "pixel", "watercolor", "neon", "ink")


def subject_recipe(name: str, **settings) -> WorldLoraRecipe:
    # The individual in five styles, not five 'flat' renders: the world's VAE loses some individuals in some
    # styles (robot_09 in flat, encoded and decoded, looked blue, not purple), and a one-style set also ties the
    # trigger to that style. Every layer with LoCon convs at 1e-3, as the style recipe. lora_learning benchmark
    # (train seed 1, 16 samples each, oracle of 5305cf7), content similarity gain / right individual, old recipe
    # (5 flat images, attention only, 5e-4; its --subject-settings example) -> this one: teapot_08 +0.30 (4/16) -> +0.40 (9/16), robot_09 +0.17
    # (3/16) -> +0.20 (8/16), fish_08 +0.10 (3/16) -> +0.25 (12/16), house_09 +0.09 (3/16) -> +0.21 (6/16).
    # With the previous oracle, on robot_09: five styles alone +0.04, five styles on every layer +0.14; 400 steps
    # instead of 200 or unbiased timesteps did not help. Training costs ~1.5x the old recipe's (28 s vs 19 s for
    # teapot_08 on one core).
    settings.setdefault("styles", SUBJECT_STYLES)
    settings.setdefault("layers", "all")
    settings.setdefault("conv_rank", 8)
    settings.setdefault("learning_rate", 1e-3)
    return WorldLoraRecipe("subject", name, **settings)


def style_recipe(name: str, **settings) -> WorldLoraRecipe:
    # one image x 10 repeats would be 10 samples an epoch: more repeats, same steps as a subject
    settings.setdefault("repeats", 20)
    settings.setdefault("batch", 4)
    settings.setdefault("epochs", 40)
    # Texture lives in the resnets' 3x3 convs as much as in attention: an attention-only style LoRA at 5e-4
    # did not move the oracle's style score of crayon at all (0.08 vs 0.05 without it, 12 samples), every layer
    # with LoCon convs at 1e-3 reached 0.60 on prompts like its training image's (measured 2026-11-23).
    settings.setdefault("layers", "all")
    settings.setdefault("conv_rank", 8)
    settings.setdefault("learning_rate", 1e-3)
    return WorldLoraRecipe("style", name, **settings)


def train_config(recipe: WorldLoraRecipe, data_dir: Path, out_dir: Path, *, log: bool = True,
                 save_every_n_epochs: int | None = None):  # fmt: skip
    """The `TrainConfig` of a recipe (what `examples/world_*_lora.toml` spell out as TOML)."""
    from lorafuse.train.config import (
        DatasetConfig,
        LossConfig,
        ModelConfig,
        NetworkConfig,
        OptimizerConfig,
        SchedulerConfig,
        TrainConfig,
        TrainingConfig,
    )

    layers = recipe.layer_preset
    network = NetworkConfig(
        network_dim=recipe.rank, network_alpha=recipe.alpha, layers=layers, network_train_unet_only=True,
        conv_dim=recipe.conv_rank or None, conv_alpha=float(recipe.conv_rank) if recipe.conv_rank else None,
    )  # fmt: skip
    return TrainConfig(
        model=ModelConfig(pretrained_model_name_or_path=recipe.base),
        dataset=DatasetConfig(
            train_data_dir=data_dir, resolution=64, cache_latents=True, cache_text_encoder_outputs=True,
            flip_aug=recipe.kind == "style",  # a style has no left and right; a subject's markings may
        ),  # fmt: skip
        network=network,
        optimizer=OptimizerConfig(optimizer_type="AdamW", learning_rate=recipe.learning_rate),
        scheduler=SchedulerConfig(lr_scheduler="cosine", lr_warmup_steps=0.05),
        # content forms early in sampling (noisy timesteps), style late (clean ones): ai-toolkit's bias
        loss=LossConfig(timestep_bias="content" if recipe.kind == "subject" else "style", min_snr_gamma=5.0),
        training=TrainingConfig(
            max_train_epochs=recipe.epochs, train_batch_size=recipe.batch, seed=recipe.seed, output_dir=out_dir,
            output_name=recipe.stem, logging="csv" if log else "none", save_every_n_epochs=save_every_n_epochs,
        ),  # fmt: skip
    )


def recipe_paths(recipe: WorldLoraRecipe, work_dir: str | Path) -> tuple[Path, Path]:
    """(dataset folder, run folder) of `recipe` under `work_dir`, as `train_world_lora` lays them out."""
    work = Path(work_dir)
    return work / "data" / recipe.stem, work / "runs" / recipe.stem


def train_world_lora(recipe: WorldLoraRecipe, work_dir: str | Path, *, progress: bool = True,
                     retrain: bool = False, save_every_n_epochs: int | None = None) -> Path:  # fmt: skip
    """Train (or reuse) the LoRA of `recipe` under `work_dir`; returns the .safetensors path.

    save_every_n_epochs: also keep kohya's intermediate files `<stem>-<epoch:06d>.safetensors` beside the final
    one (see `epoch_checkpoints`). Not part of the cache key: saving reads the weights and draws no random
    numbers, so the final file is the same with or without it; a reused LoRA keeps whatever its run saved.

    Layout: work_dir/data/<stem>/ (the kohya dataset and its references/), work_dir/runs/<stem>/ (the trainer's
    outputs: LoRA file, effective config, loss CSV and plot).
    """
    from lorafuse.train.loop import train_lora
    from lorafuse.world.dataset import write_style_dataset, write_subject_dataset

    data, run = recipe_paths(recipe, work_dir)
    lora = run / f"{recipe.stem}.safetensors"
    if lora.exists() and not retrain:
        return lora
    if not (data / "world_dataset.json").exists():
        if data.exists():  # an interrupted write: the dataset is cheap, start it again
            import shutil

            shutil.rmtree(data)
        if recipe.kind == "subject":
            styles = recipe.styles or ("flat",)
            write_subject_dataset(recipe.name, data, n=recipe.images, repeats=recipe.repeats, seed=recipe.seed,
                                  styles=styles)  # fmt: skip
        else:
            write_style_dataset(recipe.name, data, n=recipe.images, repeats=recipe.repeats, seed=recipe.seed)
    result = train_lora(train_config(recipe, data, run, save_every_n_epochs=save_every_n_epochs),
                        progress_bar=progress)
    if result.stopped:  # Ctrl-C stopped the training cleanly; the command that asked for the LoRA stops too
        raise KeyboardInterrupt
    if result.lora_path != lora:
        raise RuntimeError(f"trainer wrote {result.lora_path}, expected {lora}")
    return lora


def estimate_recipe_bytes(recipe: WorldLoraRecipe, work_dir: str | Path) -> int:
    """An upper bound of what `train_world_lora` adds under `work_dir`: nothing for a LoRA trained already, else
    its dataset and its run's outputs (`train.disk_estimate`, the LoRA sized on the base built on the meta
    device; a base whose configs cannot tell its shapes is checked by the run itself)."""
    from lorafuse.train.disk_estimate import PLANNED_RECORD, estimate_outputs, meta_network
    from lorafuse.world.dataset import CAPTION, estimate_bytes

    data, run = recipe_paths(recipe, work_dir)
    if (run / f"{recipe.stem}.safetensors").exists():
        return 0
    cfg = train_config(recipe, data, run)
    sized = meta_network(cfg)
    batches = recipe.images * recipe.repeats  # micro-batches an epoch, at most
    record = PLANNED_RECORD + recipe.images * CAPTION  # its tags come from the captions
    run_bytes = 0 if sized is None else estimate_outputs(cfg, batches, record, sized[1]).output
    return estimate_bytes(recipe.images) + run_bytes


def epoch_checkpoints(recipe: WorldLoraRecipe, work_dir: str | Path) -> dict[int, Path]:
    """{epoch: file} of the LoRAs a `train_world_lora(..., save_every_n_epochs=N)` run kept, the final one
    included (at `recipe.epochs`) when it exists."""
    run = Path(work_dir) / "runs" / recipe.stem
    found = {}
    for path in run.glob(f"{recipe.stem}-*.safetensors"):
        suffix = path.stem.rpartition("-")[2]
        if suffix.isdigit():  # kohya's '-000005'; step saves are '-step00000040' and are not epochs
            found[int(suffix)] = path
    final = run / f"{recipe.stem}.safetensors"
    if final.exists():
        found[recipe.epochs] = final
    return dict(sorted(found.items()))


def recipe_with(recipe: WorldLoraRecipe, **changes) -> WorldLoraRecipe:
    return replace(recipe, **changes)
