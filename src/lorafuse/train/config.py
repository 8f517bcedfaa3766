"""LoRA training settings as typed, frozen dataclasses; one TOML table per class, names as kohya sd-scripts.

A kohya user can read `[network] network_dim` or `[loss] huber_schedule` without a glossary. Each class checks
its own fields in `__post_init__` (messages start with the field name; `load_config` adds file and table);
`TrainConfig` checks combinations across tables. Load with `load_train_config(path, overrides)`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lorafuse.config.checks import as_paths
from lorafuse.config.checks import bad as _bad
from lorafuse.config.checks import check_positive as _positive
from lorafuse.config.checks import check_rates as _rates
from lorafuse.config.toml_io import load_config
from lorafuse.train import config_limits as lim
from lorafuse.train.config_network import NetworkConfig
from lorafuse.train.config_optim import LossConfig, OptimizerConfig, SchedulerConfig
from lorafuse.train.config_subsets import SubsetConfig
from lorafuse.train.loraplus import ratios


@dataclass(frozen=True)
class ModelConfig:
    # base model: a diffusers folder, a .safetensors checkpoint, or world / world-random / sd15-tiny / sdxl-tiny
    pretrained_model_name_or_path: str
    # train with v-prediction targets (SD2.x-v style bases); on if the base's scheduler says so
    v_parameterization: bool = False
    # kohya / A1111 numbering: 1 = last layer, 2 = penultimate. diffusers' `clip_skip` is this minus 1.
    clip_skip: int = 1
    # embedded guidance the transformer of a guidance-distilled base (FLUX.1 dev) gets while training; kohya's
    # FLUX guide trains with 1.0 (its option's default is 3.5). Bases without a guidance embedding ignore it.
    guidance_scale: float = 1.0
    # the frozen denoiser's Linear weights stored in 8 bits while the LoRA trains: none, int8 (torchao, any
    # device), fp8 (CUDA with float8 support; kohya's fp8_base). Saves ~3/4 of those weights' memory
    quantize_base: str = "none"
    # FLUX.1 as kohya's flux_train_network.py / ComfyUI keep it, pretrained_model_name_or_path being the
    # transformer file (BFL names, fp8 / fp16 / bf16): its VAE file (ae.safetensors)
    ae: str | None = None
    # FLUX.1's CLIP-L text encoder file beside the transformer file (clip_l.safetensors)
    clip_l: str | None = None
    # FLUX.1's T5-XXL text encoder file beside the transformer file (t5xxl_fp16.safetensors)
    t5xxl: str | None = None
    # for those files: a diffusers FLUX.1 folder or Hugging Face cache id whose tokenizer/ and tokenizer_2/ (and
    # component configs, if it has them) are used; None: openai/clip-vit-large-patch14 and google/t5-v1_1-xxl's
    # tokenizers from the local cache. Nothing downloads
    tokenizers: str | None = None

    def __post_init__(self) -> None:
        if not self.pretrained_model_name_or_path:
            raise _bad("pretrained_model_name_or_path", "must not be empty")
        if self.tokenizers is not None and not self.part_files:
            raise _bad("tokenizers", "completes the separate files ae / clip_l / t5xxl, and none is set")
        if self.quantize_base not in ("none", "int8", "fp8"):
            raise _bad("quantize_base", f"must be none, int8 or fp8, got {self.quantize_base!r}")
        if self.clip_skip < 1:
            raise _bad("clip_skip", f"must be >= 1 (kohya numbering, 1 = last layer), got {self.clip_skip}")
        lim.check_at_most(self, lim.MAX_CLIP_SKIP, "the layers of any base's text encoder", "clip_skip",
                          hint="; 1 is the last layer, 2 the penultimate (kohya numbering)")  # fmt: skip
        _positive(self, "guidance_scale")

    @property
    def part_files(self) -> dict[str, str]:
        """The separate component files given, by option name (`models.load.load_base_pipeline`'s parts)."""
        return {k: v for k in ("ae", "clip_l", "t5xxl") if (v := getattr(self, k)) is not None}

    @property
    def diffusers_clip_skip(self) -> int | None:
        return None if self.clip_skip == 1 else self.clip_skip - 1


@dataclass(frozen=True)
class DatasetConfig:
    # folder of '<repeats>_<trigger> <class>' subfolders with images and captions (kohya layout); or use subsets
    train_data_dir: Path | None = None
    # regularisation images, same layout; balanced against the training images as kohya does
    reg_data_dir: Path | None = None
    # training size in pixels: 512, or [width, height] (kohya's "512,768"); each side a multiple of 8. With
    # enable_bucket, width x height is the largest bucket area
    resolution: int | tuple[int, int] = 512
    # caption file beside each image: 001.png -> 001.txt
    caption_extension: str = ".txt"
    # shuffle the comma-separated tags every epoch (after the first keep_tokens)
    shuffle_caption: bool = False
    # leading tags kept in place by shuffle_caption and tag dropout
    keep_tokens: int = 0
    # probability of training a sample with an empty caption
    caption_dropout_rate: float = 0.0
    # probability of dropping each tag (not the kept ones)
    caption_tag_dropout_rate: float = 0.0
    # Caption for images without a caption file; None = the folder's "<trigger> <class>" tokens.
    class_tokens: str | None = None
    # Prepended as the first tag of every caption not already containing it (so keep_tokens = 1 keeps it first).
    trigger: str | None = None
    # random horizontal flips
    flip_aug: bool = False
    # random instead of centre crops (not with cache_latents)
    random_crop: bool = False
    # weight the loss by each image's alpha channel (kohya's alpha_mask): transparent pixels do not train
    alpha_mask: bool = False
    # aspect-ratio buckets instead of square crops
    enable_bucket: bool = False
    # smallest bucket side in pixels
    min_bucket_reso: int = 256
    # largest bucket side in pixels
    max_bucket_reso: int = 1024
    # bucket sides are multiples of this
    bucket_reso_steps: int = 64
    # never enlarge an image to fill a bucket
    bucket_no_upscale: bool = False
    # encode every image with the VAE once, before training
    cache_latents: bool = False
    # keep the latent cache in safetensors files beside the images (or in cache_dir)
    cache_latents_to_disk: bool = False
    cache_dir: Path | None = None  # None: cache files beside the images, as kohya's .npz files
    # encode every caption once (needs network_train_unet_only, fixed captions)
    cache_text_encoder_outputs: bool = False
    # keep the text-encoder cache on disk
    cache_text_encoder_outputs_to_disk: bool = False
    # an image that does not decode: stop with an error (fail) or leave it out (skip)
    on_bad_image: Literal["fail", "skip"] = "fail"
    # loss weight of regularisation images
    prior_loss_weight: float = 1.0
    # image folders with their own repeats and settings ([[dataset.subsets]], kohya's dataset_config subsets)
    subsets: tuple[SubsetConfig, ...] = ()
    # captions up to 150 or 225 tokens, encoded in 75-token chunks as kohya; None = CLIP's 75
    max_token_length: int | None = None
    # T5 tokens of FLUX.1 captions (kohya's t5xxl_max_token_length); None = FluxPipeline's 512
    t5xxl_max_token_length: int | None = None
    # fraction of the training images held out for the validation loss (kohya's validation_split)
    validation_split: float = 0.0
    # seed of the held-out split; None: the training seed
    validation_seed: int | None = None

    def __post_init__(self) -> None:
        as_paths(self, "train_data_dir", "reg_data_dir", "cache_dir")
        if self.train_data_dir is None and not self.subsets:
            raise _bad(
                "train_data_dir", "is not set, and there are no [[dataset.subsets]]: where are the images?"
            )
        if self.train_data_dir is not None and self.subsets:
            raise _bad("subsets", "and train_data_dir are both set; describe the images one way or the other")
        if self.reg_data_dir is not None and self.subsets:
            raise _bad("reg_data_dir", "cannot be used with subsets; add a subset with is_reg = true instead")
        if self.max_token_length not in (None, 75, 150, 225):
            raise _bad(
                "max_token_length", f"must be 75, 150 or 225 (kohya's choices), got {self.max_token_length}"
            )
        _positive(self, "t5xxl_max_token_length")
        if not 0.0 <= self.validation_split < 1.0:
            raise _bad("validation_split", f"must be in [0, 1), got {self.validation_split}")
        if any(side <= 0 or side % 8 for side in self.size):
            raise _bad(
                "resolution",
                f"must be a positive multiple of 8 (the VAE works in 8x8 cells), got {self.resolution}",
            )
        lim.check_at_most(self, lim.MAX_SIDE, lim.SIDE_WHY, "resolution", "min_bucket_reso", "max_bucket_reso",
                          "bucket_reso_steps", hint=lim.SIDE_HINT)  # fmt: skip
        lim.check_at_most(self, lim.MAX_T5_TOKENS, "FluxPipeline's T5 caption length", "t5xxl_max_token_length")
        if self.keep_tokens < 0:
            raise _bad("keep_tokens", f"must be >= 0, got {self.keep_tokens}")
        if not self.caption_extension.startswith(".") or len(self.caption_extension) < 2:
            raise _bad(
                "caption_extension",
                f"must be a file extension such as '.txt', got {self.caption_extension!r}",
            )
        _rates(self, "caption_dropout_rate", "caption_tag_dropout_rate")
        if self.prior_loss_weight < 0:
            raise _bad("prior_loss_weight", f"must be >= 0, got {self.prior_loss_weight}")
        step = self.bucket_reso_steps
        if step <= 0 or step % 8:
            raise _bad("bucket_reso_steps", f"must be a positive multiple of 8, got {step}")
        if self.enable_bucket:
            for key in ("min_bucket_reso", "max_bucket_reso"):
                if getattr(self, key) <= 0 or getattr(self, key) % step:
                    raise _bad(
                        key,
                        f"must be a positive multiple of bucket_reso_steps ({step}), got {getattr(self, key)}",
                    )
            if not self.min_bucket_reso <= min(self.size) <= max(self.size) <= self.max_bucket_reso:
                lo, hi = self.min_bucket_reso, self.max_bucket_reso
                raise _bad(
                    "resolution",
                    f"must lie in [min_bucket_reso, max_bucket_reso] = [{lo}, {hi}], got {self.resolution}",
                )
        if self.cache_latents_to_disk and not self.cache_latents:
            raise _bad("cache_latents_to_disk", "needs cache_latents = true as well")
        if self.cache_text_encoder_outputs_to_disk and not self.cache_text_encoder_outputs:
            raise _bad(
                "cache_text_encoder_outputs_to_disk", "needs cache_text_encoder_outputs = true as well"
            )
        if self.cache_latents and (self.random_crop or any(sub.random_crop for sub in self.subsets)):
            # A cached latent is one fixed crop: a per-epoch random crop would silently become a constant one.
            raise _bad("random_crop", "cannot be used with cache_latents (the cache stores one center crop)")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of `resolution`."""
        r = self.resolution
        return (r, r) if isinstance(r, int) else (r[0], r[1])


@dataclass(frozen=True)
class TrainingConfig:
    max_train_epochs: int | None = None  # when set, decides the total steps instead of max_train_steps
    # optimizer steps of the run (unless max_train_epochs is set)
    max_train_steps: int = 1600
    # images per batch (per process)
    train_batch_size: int = 1
    # batches per optimizer step
    gradient_accumulation_steps: int = 1
    # recompute activations in the backward pass: less memory, slower
    gradient_checkpointing: bool = False
    # with gradient_checkpointing, the checkpointed blocks' inputs and the other saved activations wait in host
    # memory instead of on the GPU (kohya's option of that name); gradients unchanged, two copies per block
    cpu_offload_checkpointing: bool = False
    # FLUX.1: keep this many transformer blocks' frozen weights in host memory, each brought to the GPU only while
    # it runs (kohya's blocks_to_swap: N // 2 double and 2 (N - N // 2) single blocks); needs gradient_checkpointing
    blocks_to_swap: int = 0
    # compute dtype of the frozen base: no (float32), fp16, bf16; LoRA weights stay float32
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # on a CUDA device, stop before loading when the estimated peak memory does not fit (`--estimate`); false
    # trains anyway
    memory_check: bool = True
    # seeds data order, augmentation, noise, timesteps and the LoRA's initial weights
    seed: int = 42
    # where LoRA files, states, logs, samples and the effective config go
    output_dir: Path = Path("output")
    # file name stem: NAME.safetensors, NAME-000001.safetensors, NAME-step00000100.safetensors
    output_name: str = "last"
    # save a LoRA file every N epochs (the last epoch is the final file)
    save_every_n_epochs: int | None = None
    # save a LoRA file every N optimizer steps
    save_every_n_steps: int | None = None
    # with every save, also write a resumable state folder (NAME-...-state)
    save_state: bool = False
    # dtype of the saved LoRA files: float (float32), fp16, bf16 (half the size). States stay float32 so that a
    # resume is exact.
    save_precision: Literal["float", "fp16", "bf16"] = "float"
    # file format of LoRA files; only safetensors (kohya's ckpt / pt are pickles, refused with the reason)
    save_model_as: str = "safetensors"
    # key layout of the LoRA files: kohya (A1111, ComfyUI, kohya, diffusers all load it) or diffusers (PEFT names)
    lora_format: Literal["kohya", "diffusers"] = "kohya"
    # keep only the newest N LoRA files saved by save_every_n_epochs (older ones are deleted)
    save_last_n_epochs: int | None = None
    # keep only the step saves of the last N steps (older save_every_n_steps files are deleted)
    save_last_n_steps: int | None = None
    # the same for state folders (None: keep every state)
    save_last_n_epochs_state: int | None = None
    save_last_n_steps_state: int | None = None  # as save_last_n_steps, for state folders
    resume: Path | None = None  # a state folder written with save_state
    sample_every_n_epochs: int | None = None  # render sample_prompts every N epochs: samples/NAME-eNNNNNN.png
    sample_every_n_steps: int | None = None  # ... and every N optimizer steps: samples/NAME-sNNNNNNNN.png
    # prompts for the sample grids; "PROMPT --n NEGATIVE" gives a negative prompt (kohya's prompt-file option)
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20  # denoising steps per sample
    # compute the validation loss every N optimizer steps and at the end (needs validation_split; unset: at the
    # end only); fixed noise and timesteps
    validate_every_n_steps: int | None = None
    # csv: loss and LR per step in logs/NAME.csv and a PNG plot; jsonl: also a .jsonl; tensorboard: also tensorboard; none
    logging: Literal["csv", "jsonl", "tensorboard", "none"] = "csv"

    def __post_init__(self) -> None:
        as_paths(self, "output_dir", "resume")
        _positive(
            self, "max_train_epochs", "max_train_steps", "train_batch_size", "gradient_accumulation_steps"
        )
        _positive(self, "save_every_n_epochs", "save_every_n_steps", "sample_every_n_epochs", "sample_every_n_steps",
                  "sample_steps")  # fmt: skip
        _positive(self, "validate_every_n_steps")
        lim.check_at_most(self, lim.MAX_STEPS, "the 8-digit step numbers in saved file names can count",
                          "max_train_steps")  # fmt: skip
        lim.check_at_most(self, lim.MAX_EPOCHS, "the 6-digit epoch numbers in saved file names can count",
                          "max_train_epochs")  # fmt: skip
        lim.check_at_most(self, lim.MAX_BATCH, "any accelerator's memory holds", "train_batch_size",
                          hint="; `lorafuse train --estimate` shows what a batch size needs")  # fmt: skip
        lim.check_at_most(self, lim.MAX_BLOCKS_TO_SWAP, "FLUX.1's transformer has to swap", "blocks_to_swap")
        lim.check_at_most(self, lim.MAX_SAMPLE_STEPS, "the training timesteps a sampler can walk", "sample_steps")
        if self.seed < 0:
            raise _bad("seed", f"must be >= 0 (it seeds numpy's SeedSequence), got {self.seed}")
        if not self.output_name or "/" in self.output_name:
            raise _bad("output_name", f"must be a file name without '/', got {self.output_name!r}")
        _positive(
            self,
            "save_last_n_epochs",
            "save_last_n_steps",
            "save_last_n_epochs_state",
            "save_last_n_steps_state",
        )
        if self.save_model_as in ("ckpt", "pt"):
            raise _bad(
                "save_model_as",
                f"{self.save_model_as!r} is a Python pickle, which can run arbitrary code when loaded; lorafuse "
                "writes 'safetensors' only, which kohya, A1111, ComfyUI and diffusers all load",
            )
        if self.save_model_as != "safetensors":
            raise _bad("save_model_as", f"must be 'safetensors', got {self.save_model_as!r}")
        if self.blocks_to_swap < 0:
            raise _bad("blocks_to_swap", f"must be >= 0, got {self.blocks_to_swap}")
        if self.blocks_to_swap and not self.gradient_checkpointing:
            raise _bad(
                "blocks_to_swap",
                "needs gradient_checkpointing = true: without it the forward pass keeps every block's weights on the "
                "device for the backward pass, and swapping saves nothing",
            )
        if self.cpu_offload_checkpointing and not self.gradient_checkpointing:
            raise _bad("cpu_offload_checkpointing", "needs gradient_checkpointing = true (it offloads its checkpoints)")
        for key in ("sample_every_n_epochs", "sample_every_n_steps"):
            if getattr(self, key) is not None and not self.sample_prompts:
                raise _bad(key, "is set but sample_prompts is empty")

    def optimizer_steps_per_epoch(self, steps_per_epoch: int) -> int:
        return math.ceil(steps_per_epoch / self.gradient_accumulation_steps)

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run: from max_train_epochs when set (as kohya), else max_train_steps."""
        if self.max_train_epochs is None:
            return self.max_train_steps
        return self.max_train_epochs * self.optimizer_steps_per_epoch(steps_per_epoch)

    def num_epochs(self, steps_per_epoch: int) -> int:
        per_epoch = max(self.optimizer_steps_per_epoch(steps_per_epoch), 1)
        return math.ceil(self.total_steps(steps_per_epoch) / per_epoch)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    dataset: DatasetConfig
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        ds = self.dataset
        if self.network.network_module == "lycoris.kohya":
            if self.training.lora_format != "kohya":
                raise _bad("training.lora_format", "LyCORIS networks are written in LyCORIS's own (kohya) layout")
            if any(ratios(self.optimizer)) or self.optimizer.scale_weight_norms:
                raise _bad("optimizer.loraplus_lr_ratio", "and scale_weight_norms are for networks.lora (B·A factors)")
        if self.loss.masked_loss:
            _check_mask_sources(ds)
        if self.training.validate_every_n_steps and not ds.validation_split:
            raise _bad(
                "training.validate_every_n_steps", "needs dataset.validation_split > 0 (the held-out images)"
            )
        if ds.cache_text_encoder_outputs:
            # Cached outputs stay valid only while the text encoder and every caption stay fixed.
            if not self.network.network_train_unet_only:
                raise _bad(
                    "dataset.cache_text_encoder_outputs",
                    "needs network.network_train_unet_only = true (a trained text encoder changes its outputs)",
                )
            changing = [
                k
                for k in ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate")
                if getattr(ds, k) or any(getattr(sub, k) for sub in ds.subsets)
            ]
            if changing:
                names = ", ".join(f"dataset.{k}" for k in changing)
                raise _bad(
                    "dataset.cache_text_encoder_outputs",
                    f"cannot be used with {names} (captions change every epoch)",
                )


def _check_mask_sources(ds: DatasetConfig) -> None:
    """masked_loss promises a mask for every image: a subset without one would train unmasked without a word."""
    if not ds.subsets and not ds.alpha_mask:
        raise _bad(
            "loss.masked_loss",
            "needs loss masks: set dataset.alpha_mask = true, or give [[dataset.subsets]] a mask_dir",
        )
    for i, sub in enumerate(ds.subsets):
        alpha = ds.alpha_mask if sub.alpha_mask is None else sub.alpha_mask
        if sub.mask_dir is None and not alpha:
            raise _bad(
                "loss.masked_loss",
                f"needs a loss mask for every image, but dataset.subsets[{i}] ({sub.image_dir}) has neither "
                "mask_dir nor alpha_mask = true",
            )


def load_train_config(
    path: str | os.PathLike | None, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """`TrainConfig` from a TOML file plus CLI overrides such as `{"network.network_dim": "8"}`."""
    return load_config(TrainConfig, path, overrides)
