"""Write a FLUX.1 pipeline's components as the separate files kohya's flux_train_network.py and ComfyUI users
have (BFL transformer names, BFL/LDM VAE names, transformers' CLIP and T5 names), and its tokenizers and configs as
a diffusers folder without weights. Test-only inverse of `models/flux_files.py`, written from the other side:
the names come from BFL's and LDM's modules, not from the loader's tables."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

# diffusers -> BFL, per double block (fused rows listed in order), per single block, and top level
_DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"], "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"], "txt_mlp.2": ["ff_context.net.2"],
    "img_mod.lin": ["norm1.linear"], "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.norm.query_norm": ["attn.norm_q"], "img_attn.norm.key_norm": ["attn.norm_k"],
    "txt_attn.norm.query_norm": ["attn.norm_added_q"], "txt_attn.norm.key_norm": ["attn.norm_added_k"],
}  # fmt: skip
_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"], "norm.query_norm": ["attn.norm_q"], "norm.key_norm": ["attn.norm_k"],
}  # fmt: skip
_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
}  # fmt: skip


def transformer_to_bfl(
    sd: dict[str, torch.Tensor], num_layers: int, num_single: int
) -> dict[str, torch.Tensor]:
    out, used = {}, set()
    for bfl, name in _TOP.items():
        for p in ("weight", "bias"):
            if f"{name}.{p}" in sd:
                value = sd[f"{name}.{p}"]
                if bfl == "final_layer.adaLN_modulation.1":  # diffusers (scale, shift) -> BFL (shift, scale)
                    scale, shift = value.chunk(2)
                    value = torch.cat([shift, scale])
                out[f"{bfl}.{p}"] = value
                used.add(f"{name}.{p}")
    for kind, n, table, prefix in (
        ("double_blocks", num_layers, _DOUBLE, "transformer_blocks"),
        ("single_blocks", num_single, _SINGLE, "single_transformer_blocks"),
    ):
        for i in range(n):
            for bfl, pieces in table.items():
                if bfl.endswith("_norm"):  # qk RMSNorm: weight -> scale
                    out[f"{kind}.{i}.{bfl}.scale"] = sd[f"{prefix}.{i}.{pieces[0]}.weight"]
                    used.add(f"{prefix}.{i}.{pieces[0]}.weight")
                    continue
                for p in ("weight", "bias"):
                    names = [f"{prefix}.{i}.{x}.{p}" for x in pieces]
                    out[f"{kind}.{i}.{bfl}.{p}"] = torch.cat([sd[n] for n in names])
                    used.update(names)
    assert used == set(sd), f"diffusers weights with no BFL name: {sorted(set(sd) - used)[:3]}"
    return out


_VAE_RULES = [  # diffusers -> LDM (the names of BFL's ae)
    (r"\.resnets\.(\d+)\.conv_shortcut\.", r".resnets.\1.nin_shortcut."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
]


def vae_to_ldm(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)$", key)
        if m:  # LDM numbers the decoder's levels from the bottom
            level, kind, j, rest = levels - 1 - int(m.group(1)), m.group(2), m.group(3), m.group(4)
            key = (
                f"decoder.up.{level}.block.{j}.{rest}"
                if kind == "resnets"
                else f"decoder.up.{level}.upsample.{rest}"
            )
            key = key.replace(".conv_shortcut.", ".nin_shortcut.")
        for pattern, repl in _VAE_RULES:
            key = re.sub(pattern, repl, key)
        if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", key):
            value = value[:, :, None, None]  # LDM's 1x1 convs
        out[key] = value
    return out


def write_parts(pipe, folder: Path, *, fp8: bool = False) -> dict[str, Path]:
    """{option: path} of pipe's transformer, ae, clip_l and t5xxl files, and "tokenizers": a folder holding only
    tokenizer/, tokenizer_2/ and each component's config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    tcfg = pipe.transformer.config
    transformer = transformer_to_bfl(pipe.transformer.state_dict(), tcfg.num_layers, tcfg.num_single_layers)
    if fp8:
        transformer = {k: v.to(torch.float8_e4m3fn) for k, v in transformer.items()}
    clip = {
        f"text_model.{k.removeprefix('text_model.')}": v for k, v in pipe.text_encoder.state_dict().items()
    }
    clip["text_projection.weight"] = torch.zeros(4, 4)  # full CLIP files carry it; the text model has none
    t5 = dict(pipe.text_encoder_2.state_dict())
    del t5["encoder.embed_tokens.weight"]  # ComfyUI's t5xxl files keep only `shared`, the tied copy
    files = {
        "pretrained_model_name_or_path": ("flux1-dev.safetensors", transformer),
        "ae": ("ae.safetensors", vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels))),
        "clip_l": ("clip_l.safetensors", clip),
        "t5xxl": ("t5xxl_fp16.safetensors", t5),
    }
    paths = {}
    for option, (name, sd) in files.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, folder / name)
        paths[option] = folder / name
    tokenizers = folder / "diffusers-configs"
    pipe.tokenizer.save_pretrained(tokenizers / "tokenizer")
    pipe.tokenizer_2.save_pretrained(tokenizers / "tokenizer_2")
    for component in ("transformer", "vae"):
        getattr(pipe, component).save_config(tokenizers / component)
    for component in ("text_encoder", "text_encoder_2"):
        getattr(pipe, component).config.save_pretrained(tokenizers / component)
    paths["tokenizers"] = tokenizers
    return paths


def flux_forward(transformer) -> torch.Tensor:
    """One forward of a FLUX.1 transformer on a fixed small input (16 image and 8 text tokens, seed 1): the
    input the block-swap and offload tests compare gradients on."""
    cfg, g = transformer.config, torch.Generator().manual_seed(1)
    return transformer(
        hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([1.0]) if cfg.guidance_embeds else None,
    ).sample  # fmt: skip
