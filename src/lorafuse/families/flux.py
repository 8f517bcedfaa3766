"""FLUX.1 (dev and schnell): a rectified-flow MMDiT (`FluxTransformer2DModel`, 19 double-stream and 38
single-stream blocks) with CLIP-L (pooled) and T5-XXL (sequence) text encoders, 16-channel latents packed into
2x2 patch tokens, and (dev) an embedded guidance scale instead of classifier-free guidance.

Sampling follows diffusers' `FluxPipeline.__call__`: flow-match Euler over sigmas linspace(1, 1/T, T) shifted by
mu, which grows linearly with the image's token count (`calculate_shift`); the transformer reads t / 1000. True
CFG (a negative prompt and a scale g > 1) runs the unconditional rows as a second branch, as diffusers does.

Training (`train/loop.py` through the `training_*` hooks): CLIP-L's pooled output and T5's states as the text
conditioning, VAE latents (z − shift) · scale packed into 2x2 patch tokens, the transformer called with t / 1000
and dev's embedded guidance (`model.guidance_scale`, kohya trains with 1.0), rectified flow as the objective
(`train/objectives.py`: kohya's and diffusers' timestep samplings). LoRAs go on the transformer and CLIP-L.

Presets. `attn` is the attention projections of both block kinds: double blocks' image (`to_q/k/v`, `to_out.0`)
and text (`add_q/k/v_proj`, `to_add_out`) projections, single blocks' `to_q/k/v` (their output projection
`proj_out` is shared with the MLP). `default`/`all` are every Linear of every block (kohya's FLUX LoRA
targets); `double`/`single` restrict that to one kind.
CRAFT (provisional, not yet measured on FLUX): content = the double blocks and the first half of the single
blocks, style = the second half of the single blocks. Source: SplitFlux (Yang et al., arXiv 2511.15258, §3),
which finds early single-stream blocks control content and later ones style. To be replaced by a measured
split once a DiT world base exists.
B-LoRA is refused: its blocks were found in SDXL's UNet and nobody has published FLUX equivalents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from lorafuse.errors import UserInputError
from lorafuse.families.base import Family
from lorafuse.families.clip import encode_pooled, tokenize
from lorafuse.families.conditioning import Conditioning, GuidanceCond
from lorafuse.families.layers import Rule, blocks, pattern, span
from lorafuse.families.sd15 import CLIP_L
from lorafuse.families.unet import meta_modules

TRANSFORMER = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json (schnell: guidance_embeds=False)
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
VAE = dict(  # FLUX.1 ae: 16 latent channels, no quant convs, shifted and scaled latents
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
)
T5_XXL = dict(  # google/t5-v1_1-xxl encoder, as FLUX.1 ships it (text_encoder_2)
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)
SCHEDULER_DEV = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)  # fmt: skip
SCHEDULER_SCHNELL = {**SCHEDULER_DEV, "shift": 1.0, "use_dynamic_shifting": False}
MLP_RATIO = 4  # FluxSingleTransformerBlock's mlp_hidden_dim = 4 · dim (not configurable in diffusers or BFL)
MAX_SEQUENCE_LENGTH = 512  # T5 tokens, FluxPipeline's default
DEFAULT_EMBEDDED_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale for dev

# Black Forest Labs' module names -> diffusers' (fused Linears list their row blocks in order): base weights
# (models/flux_files.py) and LoRA files (lora/flux_keys.py) use the same table
BFL_DOUBLE: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
BFL_SINGLE: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
BFL_TOP: dict[str, str] = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
# AdaLayerNormContinuous chunks its output as (scale, shift); BFL's final layer as (shift, scale)
BFL_SWAPPED = frozenset({"final_layer.adaLN_modulation.1"})

DOUBLE, SINGLE = "transformer_blocks", "single_transformer_blocks"
DOUBLE_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
SINGLE_ATTN = r"attn\.(to_q|to_k|to_v)"
EVERY_LINEAR = r".+"
_ALL = [pattern(rf"{DOUBLE}\.\d+", EVERY_LINEAR), pattern(rf"{SINGLE}\.\d+", EVERY_LINEAR)]


def _craft(num_layers: int, num_single: int) -> dict[str, list[Rule]]:
    half = num_single // 2
    return {
        "craft_content": blocks(EVERY_LINEAR, *span(DOUBLE, num_layers), *span(SINGLE, half)),
        "craft_style": blocks(EVERY_LINEAR, *span(SINGLE, num_single - half, start=half)),
    }


def transformer_shapes(config: Mapping) -> dict[str, tuple[int, int]]:
    """{canonical key: weight shape} of every Linear of a `FluxTransformer2DModel` with this config.

    Written out from the architecture because building the real-size model, even on the meta device, takes
    ~20 s on a busy CPU; tests/lora/test_flux_lora_files.py checks it against a built tiny model.
    """
    d = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    mlp = MLP_RATIO * d
    out_channels = config.get("out_channels") or config["in_channels"]
    shapes: dict[str, tuple[int, int]] = {
        "time_text_embed.timestep_embedder.linear_1": (d, 256),  # sinusoidal projection to 256 channels
        "time_text_embed.timestep_embedder.linear_2": (d, d),
        "time_text_embed.text_embedder.linear_1": (d, int(config["pooled_projection_dim"])),
        "time_text_embed.text_embedder.linear_2": (d, d),
        "context_embedder": (d, int(config["joint_attention_dim"])),
        "x_embedder": (d, int(config["in_channels"])),
        "norm_out.linear": (2 * d, d),
        "proj_out": (int(config.get("patch_size", 1)) ** 2 * int(out_channels), d),
    }
    if config.get("guidance_embeds"):
        shapes["time_text_embed.guidance_embedder.linear_1"] = (d, 256)
        shapes["time_text_embed.guidance_embedder.linear_2"] = (d, d)
    double = {
        "norm1.linear": (6 * d, d),
        "norm1_context.linear": (6 * d, d),
        "ff.net.0.proj": (mlp, d),
        "ff.net.2": (d, mlp),
        "ff_context.net.0.proj": (mlp, d),
        "ff_context.net.2": (d, mlp),
    }
    for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        double[f"attn.{name}"] = (d, d)
    single = {
        "norm.linear": (3 * d, d),
        "proj_mlp": (mlp, d),
        "proj_out": (d, d + mlp),
        **{f"attn.{n}": (d, d) for n in ("to_q", "to_k", "to_v")},
    }
    for i in range(int(config["num_layers"])):
        shapes.update({f"transformer_blocks.{i}.{k}": v for k, v in double.items()})
    for i in range(int(config["num_single_layers"])):
        shapes.update({f"single_transformer_blocks.{i}.{k}": v for k, v in single.items()})
    return {f"transformer.{k}": v for k, v in shapes.items()}


@dataclass(frozen=True)
class FluxDenoiser:
    """`ModelFn` over a `FluxTransformer2DModel`: x (N, tokens, 64) packed latents, t in [0, 1000] -> velocity.

    img_ids: (tokens, 3) RoPE positions of the image tokens; embedded_guidance: dev's guidance scale, or None."""

    transformer: nn.Module
    img_ids: Tensor
    embedded_guidance: float | None = None
    module: nn.Module = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "module", self.transformer)

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if len(x) != len(cond):
            raise ValueError(f"{len(x)} latent rows but {len(cond)} conditioning rows")
        n = len(x)
        timestep = t.expand(n).to(x.dtype)
        guidance = None
        if self.embedded_guidance is not None:
            guidance = torch.full([n], self.embedded_guidance, device=x.device, dtype=torch.float32)
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=cond.embeds.dtype)
        return self.transformer(
            hidden_states=x, timestep=timestep / 1000, guidance=guidance, pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds, txt_ids=txt_ids, img_ids=self.img_ids, return_dict=False,
        )[0]  # fmt: skip


def _is_flux(module: Any) -> bool:
    return type(module).__name__ == "FluxTransformer2DModel"


class Flux(Family):
    name = "flux"
    label = "FLUX.1"
    pipeline_class = "FluxPipeline"
    denoiser_component = "transformer"
    components = ("transformer", "text_encoder", "text_encoder_2")
    objective = "flow"
    default_resolution = 1024
    default_scheduler = None  # the pipeline's FlowMatchEulerDiscreteScheduler
    schedulers = (None,)
    default_guidance = 1.0  # no true CFG: dev is guidance-distilled (embedded_guidance), schnell needs none
    key_layout = "flux"
    modelspec_arch = "flux-1-dev"
    ss_base_version = "flux1"
    implementation = "https://github.com/black-forest-labs/flux"
    block_pattern = rf"^({DOUBLE}|{SINGLE})\.\d+$"
    trainable_text_encoders = ("text_encoder",)  # CLIP-L, as kohya's lora_flux (T5 LoRAs are not trained)
    uses_clip_skip = False  # FLUX reads CLIP-L's pooled output and T5's last layer
    long_prompts = False  # kohya's 75-token CLIP windows: FLUX reads long captions through T5 instead
    # kohya's FLUX.1 files: BFL transformer names under lora_unet_, CLIP-L under lora_te1_ (lora/flux_keys.py)
    # kohya's lora_flux numbers the text encoders: CLIP-L lora_te1_, T5-XXL lora_te3_
    kohya_prefixes: ClassVar = {"transformer": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"}
    uniform_alpha_ok = False  # fused-qkv modules carry their own alphas (lora/formats/kohya.py)
    kohya_network_module = "networks.lora_flux"
    modelspec_prediction_type = None  # rectified flow: neither epsilon nor v
    tiny_bases: ClassVar = {
        "flux-tiny": "tiny_flux:tiny_flux_pipeline",
        "flux-schnell-tiny": "tiny_flux:tiny_flux_schnell_pipeline",
    }
    # kohya's flux_train_network.py and ComfyUI keep the transformer, the VAE and both text encoders as files
    part_files = ("ae", "clip_l", "t5xxl")
    parts_loader = "flux_parts:load_flux_parts"
    presets: ClassVar = {
        "attn": [pattern(rf"{DOUBLE}\.\d+", DOUBLE_ATTN), pattern(rf"{SINGLE}\.\d+", SINGLE_ATTN)],
        "default": _ALL,
        "all": _ALL,
        "double": _ALL[:1],
        "single": _ALL[1:],
        **_craft(TRANSFORMER["num_layers"], TRANSFORMER["num_single_layers"]),
    }
    refused: ClassVar = {
        name: "B-LoRA's content and style blocks were found in SDXL's UNet; no FLUX blocks have been published"
        for name in ("blora", "blora_content", "blora_style")
    }
    provisional: ClassVar = {
        "craft_content": "SplitFlux (arXiv 2511.15258): early single blocks carry content; not measured here yet",
        "craft_style": "SplitFlux (arXiv 2511.15258): late single blocks carry style; not measured here yet",
    }

    # --- detection ---------------------------------------------------------------------------------------

    def matches(self, components: Mapping[str, nn.Module]) -> bool:
        return _is_flux(components.get("transformer"))

    def matches_checkpoint(self, keys: Collection[str]) -> bool:
        # BFL's original names, bare or under ComfyUI's model.diffusion_model. prefix
        return any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys)

    def matches_lora_keys(self, keys: Collection[str]) -> bool:
        markers = ("double_blocks", "single_blocks", "single_transformer_blocks", "transformer.transformer_blocks")
        return any(m in k for k in keys for m in markers)

    def rules(self, preset: str, denoiser: nn.Module | None = None) -> list[Rule]:
        """Presets that split by depth follow this transformer's block counts (tiny models have fewer)."""
        if denoiser is not None and preset in ("craft_content", "craft_style"):
            return _craft(denoiser.config.num_layers, denoiser.config.num_single_layers)[preset]
        return super().rules(preset, denoiser)

    # --- the denoiser -----------------------------------------------------------------------------------

    def model_fn(
        self, denoiser: nn.Module, *, height: int, width: int, embedded_guidance: float | None = None
    ) -> FluxDenoiser:
        from diffusers import FluxPipeline

        if denoiser.config.guidance_embeds and embedded_guidance is None:
            embedded_guidance = DEFAULT_EMBEDDED_GUIDANCE
        h, w = height // self._latent_factor, width // self._latent_factor
        # (h/2 * w/2, 3): row, column of each 2x2 patch token, as FluxPipeline builds them
        img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, denoiser.device, denoiser.dtype)
        return FluxDenoiser(denoiser, img_ids, embedded_guidance)

    def check_pipeline(self, pipe: Any, embedded_guidance: float | None) -> None:
        if embedded_guidance is not None and not self.denoiser(pipe).config.guidance_embeds:
            raise UserInputError(
                "embedded_guidance is for guidance-distilled FLUX.1 dev; this transformer has no guidance "
                "embedding (schnell): use guidance (true CFG with a negative prompt) instead"
            )

    # --- prompts -----------------------------------------------------------------------------------------

    def encode_prompts(
        self, pipe: Any, prompts: list[str], negatives: list[str] | None, *, clip_skip: int, height: int, width: int
    ) -> GuidanceCond:
        """CLIP-L's pooled output and T5's last hidden states (FLUX uses no clip skip); negatives None: ""."""

        def encode(texts: list[str]) -> Conditioning:
            pooled = encode_pooled(pipe.text_encoder, pipe.tokenizer, texts)  # (P, 768)
            te = pipe.text_encoder_2
            # FluxPipeline's 512 tokens, unless the tokenizer is made for fewer (a reduced-size benchmark model)
            length = min(MAX_SEQUENCE_LENGTH, pipe.tokenizer_2.model_max_length)
            ids = tokenize(pipe.tokenizer_2, texts, "T5", length).input_ids.to(te.device)
            return Conditioning(te(ids, output_hidden_states=False)[0], pooled)  # (P, 512, 4096)

        return GuidanceCond(encode(prompts), encode(negatives or [""] * len(prompts)))

    # --- latents and timesteps ---------------------------------------------------------------------------

    _latent_factor = 8  # the VAE's downsampling, 2 ** (levels - 1) as FluxPipeline computes it

    def sample_size(self, pipe: Any) -> int:
        return pipe.vae.config.sample_size  # FluxPipeline's default_sample_size (128) x 8 for the real VAE

    def size_multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor * 2  # VAE factor x the 2x2 patch

    def latent_channels(self, pipe: Any) -> int:
        return self.denoiser(pipe).config.in_channels // 4

    def pack_latents(self, latents: Tensor) -> Tensor:
        from diffusers import FluxPipeline

        n, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, n, c, h, w)  # (N, C, h, w) -> (N, h/2 * w/2, 4C)

    def unpack_latents(self, latents: Tensor, height: int, width: int, pipe: Any) -> Tensor:
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def set_timesteps(self, scheduler: Any, steps: int, device: torch.device, packed: Tensor) -> None:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(
            packed.shape[1], config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.15),
        )  # fmt: skip
        if sigmas is None:
            scheduler.set_timesteps(steps, device=device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        scheduler.set_begin_index(0)

    def scale_initial_noise(self, scheduler: Any, latents: Tensor) -> Tensor:
        return latents  # flow matching starts from the noise itself (sigma = 1)

    def model_input(self, scheduler: Any, latents: Tensor, t: Tensor) -> Tensor:
        return latents

    # --- training ------------------------------------------------------------------------------------------

    def training_text(
        self, tokenizers, encoders, captions, *, clip_skip, max_token_length, t5_max_length=None
    ) -> dict[str, Tensor]:
        """{"pooled_prompt_embeds": (B, 768) CLIP-L pooled, "encoder_hidden_states": (B, L, 4096) T5}, as
        `encode_prompts` (FluxPipeline) encodes them; L = t5_max_length, default FluxPipeline's 512 (kohya's
        t5xxl_max_token_length; kohya defaults to 256 for schnell, whose pipeline still samples with 512)."""
        self.check_text_options(max_token_length, t5_max_length)
        (clip_tok, t5_tok), (clip, t5) = tokenizers, encoders
        pooled = encode_pooled(clip, clip_tok, captions)
        length = min(t5_max_length or MAX_SEQUENCE_LENGTH, t5_tok.model_max_length)
        ids = tokenize(t5_tok, captions, "T5", length).input_ids.to(t5.device)
        states = t5(ids, output_hidden_states=False)[0]
        return {"encoder_hidden_states": states.float(), "pooled_prompt_embeds": pooled.float()}

    def check_text_options(self, max_token_length: int | None, t5_max_length: int | None) -> None:
        if max_token_length not in (None, 75):
            raise UserInputError(
                f"dataset.max_token_length = {max_token_length}: kohya's 75-token CLIP windows are for SD1.5 and "
                "SDXL; FLUX.1 reads CLIP-L's 77 tokens and T5 (set dataset.t5xxl_max_token_length instead)"
            )

    def training_denoiser(
        self, denoiser: nn.Module, *, latent_hw: tuple[int, int], guidance_scale: float | None = None
    ) -> Any:
        """Packs (B, 16, h, w) into 2x2 patch tokens, calls the transformer with t / 1000 and (dev) the embedded
        guidance `guidance_scale`, unpacks the velocity. kohya trains dev with guidance_scale 1.0."""
        from diffusers import FluxPipeline

        h, w = latent_hw
        if h % 2 or w % 2:
            raise UserInputError(f"FLUX.1 latents must have even sides (2x2 patches), got {h}x{w}")
        inner = getattr(denoiser, "module", denoiser)  # accelerate's DDP wrapper holds the transformer
        guidance = (1.0 if guidance_scale is None else guidance_scale) if inner.config.guidance_embeds else None
        fn = self.model_fn(inner, height=h * self._latent_factor, width=w * self._latent_factor,
                           embedded_guidance=guidance)  # fmt: skip
        fn = dataclasses.replace(fn, transformer=denoiser)  # called through the wrapper (gradient sync)
        pixels = (h * self._latent_factor, w * self._latent_factor)

        def call(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
            velocity = fn(self.pack_latents(x), t, cond)  # (B, h/2 * w/2, 64)
            return FluxPipeline._unpack_latents(velocity, *pixels, self._latent_factor)  # (B, 16, h, w)

        return call

    def swap_blocks(self, denoiser: nn.Module) -> tuple[Any, Any]:
        inner = getattr(denoiser, "module", denoiser)
        return inner.transformer_blocks, inner.single_transformer_blocks

    # --- reference architecture --------------------------------------------------------------------------

    def reference_lora_targets(self) -> tuple[dict[str, nn.Module], dict[str, tuple[int, ...]]]:
        """CLIP-L built, the transformer's Linears written out (`transformer_shapes`): building its 57 blocks and
        T5-XXL, even on the meta device, takes ~20 s on a busy CPU; T5 never gets a LoRA here."""
        from transformers import CLIPTextConfig, CLIPTextModel

        return meta_modules(lambda: {"text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L))}), transformer_shapes(
            TRANSFORMER
        )

    def reference_components(self) -> dict[str, Any]:
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        return meta_modules(
            lambda: {
                "transformer": FluxTransformer2DModel(**TRANSFORMER),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                "text_encoder_2": T5EncoderModel(T5Config(**T5_XXL)),
            }
        )


FAMILY = Flux()
