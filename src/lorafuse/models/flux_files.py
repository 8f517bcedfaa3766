"""The on-disk formats of FLUX.1's separate component files, as kohya's flux_train_network.py and ComfyUI read
them, turned into the state dicts of diffusers' / transformers' classes.

- transformer (`flux1-dev.safetensors`): Black Forest Labs' names (`double_blocks.0.img_attn.qkv.weight`, fused
  q/k/v and, in single blocks, q/k/v/MLP rows in one `linear1`), bare or under ComfyUI's
  `model.diffusion_model.` (its all-in-one files: only those keys are read); diffusers names are accepted as they
  are. Possibly stored in fp8.
- ae (`ae.safetensors`): BFL's autoencoder, which has the LDM VAE names (`encoder.down.0.block.0.conv1`);
  diffusers' own LDM converter turns it into `AutoencoderKL` names.
- clip_l: transformers' `CLIPTextModel` names (`text_model.encoder.layers.0...`), possibly under ComfyUI's
  `text_encoders.clip_l.transformer.`; a `text_projection` / `logit_scale` from a full CLIP file is dropped.
- t5xxl: transformers' `T5EncoderModel` names, with `shared.weight` or only `encoder.embed_tokens.weight` (the two
  are one tied tensor), possibly without the `encoder.` prefix or under ComfyUI's `text_encoders.t5xxl.transformer.`.
Every function here works on meta tensors too: the loader converts the files' headers first and checks them
against the models before it reads any weight.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from torch import Tensor

from lorafuse.errors import UserInputError
from lorafuse.families import family_of_checkpoint
from lorafuse.families.flux import BFL_DOUBLE, BFL_SINGLE, BFL_SWAPPED, BFL_TOP
from lorafuse.utils.inputs import shape_mismatch

# what each file must hold: kind -> (label for messages, key patterns that identify it)
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "transformer": (
        "a FLUX.1 transformer",
        (
            r"^(model\.diffusion_model\.)?double_blocks\.\d+\.",
            r"^transformer_blocks\.\d+\.attn\.add_k_proj\.",
        ),
    ),
    "vae": (
        "an autoencoder (VAE)",
        (
            r"^(first_stage_model\.|vae\.)?(encoder\.down|decoder\.up)\.\d+\.",
            r"^encoder\.down_blocks\.\d+\.resnets\.",
        ),
    ),
    "clip": ("a CLIP text encoder", (r"(^|\.)encoder\.layers\.\d+\.self_attn\.",)),
    "t5": ("a T5 encoder", (r"(^|\.)block\.\d+\.layer\.\d+\.SelfAttention\.",)),
}
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")  # BFL first published flux1-dev.sft and ae.sft (same format)
_WHOLE_SD = (r"^model\.diffusion_model\.(input_blocks|middle_block)\.", r"^conditioner\.embedders\.")


def read_shapes(path: Path, option: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} from the file's header (no weights read); one clear error for a missing, unreadable or
    truncated file."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise UserInputError(f"{option} = {path}: no such file")
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise UserInputError(
            f"{option} = {path}: only .safetensors / .sft files are loaded ({path.suffix} files are pickles that can "
            "run code when loaded); convert it to .safetensors first"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise UserInputError(
            f"{option} = {path}: not a readable safetensors file ({e}); a truncated file is often an "
            "interrupted download"
        ) from e
    if not shapes:
        raise UserInputError(f"{option} = {path}: the file holds no tensors")
    if any(k.endswith(("scale_weight", "scaled_fp8")) for k in shapes):
        raise UserInputError(
            f"{option} = {path}: a 'scaled fp8' checkpoint (per-tensor scale_weight keys); only plain fp8, fp16, "
            "bf16 or fp32 files are loaded"
        )
    return shapes


def describe(keys: Mapping[str, object]) -> tuple[str | None, str]:
    """(kind or None, what the file looks like, with an example key) for messages."""
    for pattern in _WHOLE_SD:
        hit = next((k for k in keys if re.search(pattern, k)), None)
        if hit is not None:
            try:
                label = f"a whole {family_of_checkpoint(list(keys), '').label} checkpoint"
            except UserInputError:
                label = "a whole Stable Diffusion checkpoint"
            return None, f"{label} (keys like {hit})"
    for kind, (label, patterns) in KINDS.items():
        hit = next((k for k in keys for p in patterns if re.search(p, k)), None)
        if hit is not None:
            return kind, f"{label} (keys like {hit})"
    return None, f"no component lorafuse knows (keys like {', '.join(list(keys)[:3])})"


def check_kind(path: Path, option: str, keys: Mapping[str, object], expected: str) -> None:
    kind, what = describe(keys)
    if kind != expected:
        raise UserInputError(f"{option} = {path}: this file holds {what}, not {KINDS[expected][0]}")


# --- transformer ---------------------------------------------------------------------------------------

_BFL_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)\.(weight|bias|scale)$")
_BFL_TOP = re.compile(r"^(.+)\.(weight|bias)$")
# qk RMSNorms: BFL's `<attn>.norm.query_norm.scale` -> diffusers' `attn.norm_q.weight`
_NORMS = {
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
}
_DIFFUSERS_BLOCK = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}


def _split_rows(value: Tensor, n: int, width: int) -> list[Tensor]:
    if n == 4:  # a single block's linear1: q, k, v (width rows each), then the MLP's rows
        return list(torch.split(value, [width, width, width, value.shape[0] - 3 * width]))
    return list(torch.chunk(value, n))


def transformer_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BFL (or ComfyUI-prefixed) FLUX.1 transformer weights -> `FluxTransformer2DModel` names; keys with no BFL
    name are kept, so the model check reports them. Hand-written because diffusers'
    `convert_flux_transformer_checkpoint_to_diffusers` fixes FLUX.1's width (inner_dim 3072): it cannot convert
    a pruned or tiny model (tests/models/test_flux_parts.py checks the two agree at the real width)."""
    prefix = "model.diffusion_model."
    if any(k.startswith(prefix) for k in sd):
        # ComfyUI's all-in-one files also hold vae. / text_encoders. weights: the separate files replace them
        sd = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    if "img_in.weight" not in sd:
        return sd  # diffusers names already (or not a transformer: the model check says so)
    width = sd["img_in.weight"].shape[0]
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = _BFL_BLOCK.match(key)
        if m:
            kind, i, module, param = m.groups()
            block = f"{_DIFFUSERS_BLOCK[kind]}.{i}."
            if param == "scale" and module in _NORMS:
                out[block + _NORMS[module] + ".weight"] = value
                continue
            pieces = (BFL_DOUBLE if kind == "double_blocks" else BFL_SINGLE).get(module)
            if pieces is not None and param != "scale":
                rows = _split_rows(value, len(pieces), width) if len(pieces) > 1 else [value]
                out.update({f"{block}{p}.{param}": r for p, r in zip(pieces, rows, strict=True)})
                continue
        m = _BFL_TOP.match(key)
        if m and m.group(1) in BFL_TOP:
            if m.group(1) in BFL_SWAPPED:  # (shift, scale) rows -> (scale, shift)
                shift, scale = value.chunk(2)
                value = torch.cat([scale, shift])
            out[f"{BFL_TOP[m.group(1)]}.{m.group(2)}"] = value
            continue
        out[key] = value
    return out


def transformer_sizes(shapes: Mapping[str, tuple[int, ...]], path: Path, option: str) -> dict[str, object]:
    """The `FluxTransformer2DModel` config values the converted weights decide: depth, width, heads, the
    channels of its inputs, and the variant (dev has a guidance embedding, schnell none)."""

    def count(prefix: str) -> int:
        return len({k.split(".")[1] for k in shapes if k.startswith(prefix + ".")})

    try:
        width, in_channels = shapes["x_embedder.weight"]
        head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
        return {
            "num_layers": count("transformer_blocks"),
            "num_single_layers": count("single_transformer_blocks"),
            "attention_head_dim": head_dim,
            "num_attention_heads": width // head_dim,
            "in_channels": in_channels,
            "joint_attention_dim": shapes["context_embedder.weight"][1],
            "pooled_projection_dim": shapes["time_text_embed.text_embedder.linear_1.weight"][1],
            "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in shapes,
        }
    except (KeyError, ValueError, IndexError) as e:
        raise UserInputError(f"{option} = {path}: a FLUX.1 transformer without its {e} weights") from e


# --- VAE and text encoders -------------------------------------------------------------------------------


def vae_to_diffusers(sd: Mapping[str, Tensor], config: Mapping[str, object]) -> dict[str, Tensor]:
    """BFL's ae (LDM VAE names) -> `AutoencoderKL` names, by diffusers' own LDM converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if any(k.startswith("encoder.down_blocks.") for k in sd):
        return dict(sd)
    return convert_ldm_vae_checkpoint(dict(sd), dict(config))


_CLIP_PREFIXES = ("text_encoders.clip_l.transformer.", "cond_stage_model.transformer.", "transformer.")
_CLIP_EXTRA = ("text_projection.weight", "logit_scale", "embeddings.position_ids")


def clip_to_transformers(sd: Mapping[str, Tensor], model_keys: Collection) -> dict[str, Tensor]:
    """kohya / ComfyUI CLIP-L keys -> this transformers version's `CLIPTextModel` names (4.x has a `text_model.`
    prefix, 5.x none)."""
    prefix = "text_model." if any(k.startswith("text_model.") for k in model_keys) else ""
    out = {}
    for key, value in sd.items():
        for p in _CLIP_PREFIXES:
            key = key.removeprefix(p)
        key = key.removeprefix("text_model.")
        if key not in _CLIP_EXTRA:
            out[prefix + key] = value
    return out


_T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "transformer.")


def t5_to_transformers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """T5-XXL encoder keys -> `T5EncoderModel` names: the `encoder.` prefix added where a file leaves it out, and
    the tied embedding under both of its names."""
    out = {}
    for key, value in sd.items():
        for p in _T5_PREFIXES:
            key = key.removeprefix(p)
        if key.startswith(("block.", "final_layer_norm.", "embed_tokens.")):
            key = "encoder." + key
        out[key] = value
    embedding = out.get("shared.weight", out.get("encoder.embed_tokens.weight"))
    if embedding is not None:
        out.setdefault("shared.weight", embedding)
        out.setdefault("encoder.embed_tokens.weight", embedding)
    return out


def check_fits(
    path: Path, option: str, got: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]], what: str,
    hint: str,
) -> None:  # fmt: skip
    """One error listing how the converted file differs from the model it is loaded into."""
    phrases = ("{n} of its {total} weights missing (e.g. {name})", "{n} unexpected (e.g. {name})",
               "{n} of another shape (e.g. {name}: {got} in the file, {want} in {what})")  # fmt: skip
    problem = shape_mismatch(got, want, phrases, what=what)
    if problem is not None:
        raise UserInputError(f"{option} = {path}: does not fit {what}: {problem}. {hint}")
