"""`Family`: everything that differs between base-model families, in one object per family.

A family owns
- detection: from a pipeline's components, a single-file checkpoint's keys, a LoRA file's keys or metadata;
- the denoiser call behind the one-line contract `model_fn(x, t, cond) -> prediction` (`model_fn`);
- prompt encoding into `Conditioning` rows (`encode_prompts`), and the latent layout the denoiser reads;
- training: the objective by name (`objective`, built by `train/objectives.py`), the text encoding, the
  conditioning rows and the denoiser call of a training step (`training_text`, `training_cond`,
  `training_denoiser`), latent normalisation, and the text encoders a LoRA may train;
- the sampling defaults (resolution, scheduler, guidance);
- its LoRA components and how its files are written: kohya prefixes, SGM UNet names, one alpha or per-module
  alphas, `ss_network_module`, `modelspec.*`; the real-size module shapes a foreign LoRA is checked against;
- the layer presets (K-LoRA, B-LoRA, CRAFT), and the presets or methods it refuses, with the reason;
- its tiny random-weight test bases (`tiny_bases`: name -> "module:builder" in `models/`), and the separate
  component files its single-file checkpoints come with (`part_files`, assembled by `parts_loader`).
Adding a family is one module that subclasses `Family`, one line in `families/registry.py` and its tiny builder
in `models/`; no other module branches on a family's name (tests/families/test_families.py checks).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lorafuse.errors import UserInputError
from lorafuse.families.conditioning import Conditioning, GuidanceCond
from lorafuse.families.layers import Rule


class Family:
    """The base family; subclasses set the class attributes and implement the methods marked abstract."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # for messages: "SDXL", "FLUX.1"
    pipeline_class: ClassVar[str] = ""  # the diffusers pipeline class, e.g. "StableDiffusionXLPipeline"
    denoiser_component: ClassVar[str] = "unet"  # the pipeline attribute holding the denoiser
    components: ClassVar[tuple[str, ...]] = ("unet", "text_encoder")  # what a LoRA file may target, in order
    objective: ClassVar[str] = "epsilon"  # training target name: "epsilon" (or the scheduler's "v_prediction"), "flow"
    default_resolution: ClassVar[int] = 512  # of the released model, in pixels
    default_scheduler: ClassVar[str | None] = "ddim"  # a `fusion.schedulers` name; None: the pipeline's own
    schedulers: ClassVar[tuple[str | None, ...]] = ("ddim", "euler", "dpmpp", None)
    default_guidance: ClassVar[float] = 7.5  # classifier-free guidance scale when none is given
    key_layout: ClassVar[str] = ""  # the key layout `lora.keys` uses for kohya names
    modelspec_arch: ClassVar[str] = ""  # `modelspec.architecture` of the LoRA files we write
    ss_base_version: ClassVar[str] = ""  # kohya's `ss_base_model_version`
    implementation: ClassVar[str] = "diffusers"  # `modelspec.implementation`
    block_pattern: ClassVar[str] = ""  # regex of the block paths presets name
    presets: ClassVar[Mapping[str, Sequence[Rule]]] = {}
    refused: ClassVar[Mapping[str, str]] = {}  # preset or fusion method -> why this family cannot have it
    provisional: ClassVar[Mapping[str, str]] = {}  # preset -> where it comes from and why it is not final
    trainable_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # text encoders a LoRA may train
    uses_clip_skip: ClassVar[bool] = True  # kohya's clip_skip applies (SDXL fixes its layer; FLUX reads none)
    long_prompts: ClassVar[bool] = True  # captions over 75 tokens go through kohya's 75-token CLIP windows
    kohya_prefixes: ClassVar[Mapping[str, str]] = {"unet": "lora_unet_", "text_encoder": "lora_te_"}  # component ->
    # the prefix of its modules in kohya files this family's trainers write
    uniform_alpha_ok: ClassVar[bool] = True  # a kohya file of this family may store one alpha for all modules
    kohya_sgm_unet: ClassVar[bool] = False  # kohya names this family's UNet modules by the SGM (LDM) blocks
    kohya_network_module: ClassVar[str] = "networks.lora"  # `ss_network_module` of the kohya files we write
    modelspec_prediction_type: ClassVar[str | None] = "epsilon"  # `modelspec.prediction_type`; None: not written
    reference_unet: ClassVar[Mapping[str, Any] | None] = None  # the released UNet's config (its SGM block layout)
    tiny_bases: ClassVar[Mapping[str, str]] = {}  # built-in tiny test base name -> "module:builder" in models/
    # the separate component files a single-file checkpoint of this family may come with (model config names,
    # e.g. FLUX.1's "ae", "clip_l", "t5xxl") and the "module:function" in models/ assembling a pipeline from them
    part_files: ClassVar[tuple[str, ...]] = ()
    parts_loader: ClassVar[str] = ""

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # --- detection ---------------------------------------------------------------------------------------

    def matches(self, components: Mapping[str, nn.Module]) -> bool:
        """True if these pipeline components ({name: module}) are this family's (abstract)."""
        raise NotImplementedError

    def matches_checkpoint(self, keys: Collection[str]) -> bool:
        """True if a single-file checkpoint with these tensor names is this family's."""
        return False

    def matches_lora_keys(self, keys: Collection[str]) -> bool:
        """True if LoRA keys name modules only this family has (shape-free; SD1.5 vs SDXL needs shapes)."""
        return False

    def rules(self, preset: str, denoiser: nn.Module | None = None) -> list[Rule]:
        """The rules of a named preset (KeyError if the family has none); `denoiser` for depth-relative presets."""
        return list(self.presets[preset])

    def check_refused(self, what: str) -> None:
        """Raise the family's reason if it cannot run preset or method `what`."""
        if what in self.refused:
            raise UserInputError(f"{what} is not available on {self.label}: {self.refused[what]}")

    # --- the denoiser -----------------------------------------------------------------------------------

    def denoiser(self, pipe: Any) -> nn.Module:
        module = getattr(pipe, self.denoiser_component, None)
        if not isinstance(module, nn.Module):
            raise UserInputError(f"this {self.label} pipeline has no {self.denoiser_component}")
        return module

    def model_fn(
        self, denoiser: nn.Module, *, height: int, width: int, embedded_guidance: float | None = None
    ) -> Any:
        """The `ModelFn` `(x, t, cond) -> prediction` over `denoiser` for images of this size (abstract)."""
        raise NotImplementedError

    def check_pipeline(self, pipe: Any, embedded_guidance: float | None) -> None:
        """Raise `UserInputError` if this pipeline of the family cannot be sampled as asked."""
        if embedded_guidance is not None:
            raise UserInputError(f"embedded_guidance is for guidance-distilled models; {self.label} has none")

    # --- prompts -----------------------------------------------------------------------------------------

    def max_clip_skip(self, pipe: Any) -> int:
        """The largest diffusers-numbered clip skip that still uses at least one transformer layer."""
        return 0

    def encode_prompts(
        self, pipe: Any, prompts: list[str], negatives: list[str] | None, *, clip_skip: int, height: int, width: int
    ) -> GuidanceCond:
        """One row of prompt and of negative-prompt conditioning per prompt (abstract).

        negatives: None is the family's default negative ("" or all-zero embeddings)."""
        raise NotImplementedError

    # --- latents and timesteps ---------------------------------------------------------------------------

    def sample_size(self, pipe: Any) -> int:
        """Default image side in pixels for this pipeline."""
        return self.denoiser(pipe).config.sample_size * pipe.vae_scale_factor

    def size_multiple(self, pipe: Any) -> int:
        """Image sides must be multiples of this."""
        return pipe.vae_scale_factor

    def latent_channels(self, pipe: Any) -> int:
        return self.denoiser(pipe).config.in_channels

    def pack_latents(self, latents: Tensor) -> Tensor:
        """(N, C, h, w) VAE latents -> the layout the denoiser reads (the same for UNets)."""
        return latents

    def unpack_latents(self, latents: Tensor, height: int, width: int, pipe: Any) -> Tensor:
        """Inverse of `pack_latents`, for images of height x width pixels."""
        return latents

    def set_timesteps(self, scheduler: Any, steps: int, device: torch.device, packed: Tensor) -> None:
        """Set the scheduler's timesteps for `steps` steps on latents `packed` (the denoiser's layout)."""
        scheduler.set_timesteps(steps, device=device)

    def scale_initial_noise(self, scheduler: Any, latents: Tensor) -> Tensor:
        """Standard-normal noise -> the first step's input (after `set_timesteps`)."""
        return latents * scheduler.init_noise_sigma

    def model_input(self, scheduler: Any, latents: Tensor, t: Tensor) -> Tensor:
        """The denoiser's input at timestep t (scaled once on B rows: elementwise, so guidance never needs it)."""
        return scheduler.scale_model_input(latents, t)

    def check_scheduler(self, name: str | None) -> None:
        if name in self.schedulers:
            return
        names = ", ".join(s for s in self.schedulers if s is not None)
        choices = f"{names}, or None for the pipeline's own" if names else "None (the pipeline's own)"
        if name in ("ddim", "euler", "dpmpp"):  # a scheduler another family runs
            raise UserInputError(f"scheduler {name!r} does not run {self.label}; expected {choices}")
        raise UserInputError(f"unknown scheduler {name!r}; expected one of {choices}")

    # --- training ------------------------------------------------------------------------------------------

    def training_text(
        self, tokenizers: Sequence[Any], encoders: Sequence[nn.Module], captions: list[str], *, clip_skip: int,
        max_token_length: int | None, t5_max_length: int | None = None,
    ) -> dict[str, Tensor]:  # fmt: skip
        """The text conditioning of a training batch, as named tensors a cache can store (abstract): at least
        "encoder_hidden_states" (B, L, D); "pooled_prompt_embeds" (B, P) when the family has one. Differentiable."""
        raise NotImplementedError

    def check_text_options(self, max_token_length: int | None, t5_max_length: int | None) -> None:
        """Raise `UserInputError` for caption-length settings this family cannot honour (before any work)."""
        if t5_max_length is not None:
            raise UserInputError(f"dataset.t5xxl_max_token_length is for FLUX.1's T5; {self.label} has no T5")

    def training_cond(self, text: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Conditioning:
        """`training_text`'s tensors (and the batch, for per-image conditioning) -> the denoiser's rows."""
        return Conditioning(text["encoder_hidden_states"], text.get("pooled_prompt_embeds"))

    def training_denoiser(
        self, denoiser: nn.Module, *, latent_hw: tuple[int, int], guidance_scale: float | None = None
    ) -> Any:
        """`(x_t, t, cond) -> prediction` with x_t and the prediction in the VAE's layout (B, C, h, w), so the
        objective and the loss never see the denoiser's own layout. guidance_scale: the embedded guidance of a
        guidance-distilled family, ignored by the others."""
        h, w = latent_hw
        return self.model_fn(denoiser, height=h * 8, width=w * 8)

    def swap_blocks(self, denoiser: nn.Module) -> tuple[Sequence[nn.Module], Sequence[nn.Module]] | None:
        """(double-stream, single-stream) blocks that `training.blocks_to_swap` may keep in host memory (kohya's
        FLUX.1 block swap); None: the family has no such blocks."""
        return None

    def normalize_latents(self, latents: Tensor, vae_config: Mapping[str, Any]) -> Tensor:
        """VAE posterior latents -> the denoiser's latent space: (z - shift_factor) * scaling_factor (no shift for
        SD's VAEs; FLUX's VAE has one)."""
        shift = vae_config.get("shift_factor") or 0.0
        return (latents - shift) * vae_config["scaling_factor"]

    # --- reference architecture --------------------------------------------------------------------------

    def reference_components(self) -> dict[str, nn.Module]:
        """{component: module} of the real-size architecture, built on the meta device (no weights)."""
        raise UserInputError(f"no reference architecture for {self.label}")

    def reference_lora_targets(self) -> tuple[dict[str, nn.Module], dict[str, tuple[int, ...]]]:
        """What a real-size LoRA of this family can target: (components built on the meta device, {canonical key:
        weight shape} of modules written out instead of built, for components too slow to build)."""
        return self.reference_components(), {}
