"""ComfyUI's LoRA loader for SD1.5 / SDXL files, re-implemented from its source for tests (comfy/lora.py:
`model_lora_keys_unet`, `model_lora_keys_clip`, `load_lora`; comfy/weight_adapter/{lora,loha,lokr}.py:
`calculate_weight`), so a file is checked the way ComfyUI reads it, not by a key regex:

- the key map: `lora_unet_` + the UNet state-dict name with "_" (its `diffusion_model.*` SGM names, and the
  diffusers names of `unet_to_diffusers`); `lora_te_` / `lora_te1_` for CLIP-L (SD1.5's only encoder, SDXL's
  first), `lora_te2_` for SDXL's CLIP-G, only for q/k/v/out_proj and fc1/fc2 of each layer;
- `load_lora` walks that map and takes `.alpha`, lora_up/lora_down(/lora_mid), hada_w1_a..hada_w2_b(/hada_t1,t2),
  lokr_w1(/_a,_b), lokr_w2(/_a,_b), lokr_t2, dora_scale; every other key is "lora key not loaded" (a warning in
  ComfyUI: that part of the file has no effect);
- ΔW per adapter, in float32, reshaped to the base weight's shape (ComfyUI logs and skips a module whose reshape
  fails, so a shape error there is silent: here it raises):
    lora: up.flatten(1) @ down.flatten(1) * alpha / down.shape[0] (alpha absent: 1)
    loha: (w1a @ w1b) * (w2a @ w2b) * alpha / w1b.shape[0] (alpha absent: 1)
    lokr: kron(w1, w2), w1 / w2 built as a @ b where stored decomposed, a 4-D w2 makes w1 [.., 1, 1];
          scaled by alpha / rank of the decomposed factor (w2's if both are), 1 when neither is decomposed.
SGM names come from `lorafuse.lora.keys.unet_to_sgm`, which tests/lora/test_lora_keys.py checks against diffusers'
own SGM converter module by module.
"""

from __future__ import annotations

import torch

from lorafuse.lora.keys import UnetLayout, unet_to_sgm

CLIP_MAP = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")
ADAPTER_KEYS = {
    "lora": ("lora_up.weight", "lora_down.weight", "lora_mid.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}


def key_map(pipe) -> dict[str, tuple[str, str]]:
    """ComfyUI's LoRA name -> (component, module path) for this SD1.5 / SDXL pipeline."""
    out: dict[str, tuple[str, str]] = {}
    layout = UnetLayout.from_config(pipe.unet.config)
    for name, _ in pipe.unet.named_parameters():
        if name.endswith(".weight"):
            path = name[: -len(".weight")]
            out["lora_unet_" + path.replace(".", "_")] = ("unet", path)
            sgm = unet_to_sgm(path, layout)
            if sgm is not None:
                out["lora_unet_" + sgm.replace(".", "_")] = ("unet", path)
    encoders = [("text_encoder", ("lora_te_", "lora_te1_"))]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders.append(("text_encoder_2", ("lora_te2_",)))
    for comp, prefixes in encoders:
        model = getattr(pipe, comp)
        root = "text_model." if hasattr(model, "text_model") else ""  # transformers 5 flattens CLIPTextModel
        for b in range(model.config.num_hidden_layers):
            for c in CLIP_MAP:
                for prefix in prefixes:
                    out[f"{prefix}text_model_encoder_layers_{b}_{c.replace('.', '_')}"] = (
                        comp,
                        f"{root}encoder.layers.{b}.{c}",
                    )
    return out


def load(tensors: dict[str, torch.Tensor], pipe) -> tuple[dict[tuple[str, str], tuple], set[str]]:
    """ComfyUI's load_lora: {(component, path): (adapter kind, {part: tensor}, alpha)} and the keys not loaded."""
    patches: dict[tuple[str, str], tuple] = {}
    loaded: set[str] = set()
    for name, target in key_map(pipe).items():
        alpha = None
        if f"{name}.alpha" in tensors:
            alpha = tensors[f"{name}.alpha"].item()
            loaded.add(f"{name}.alpha")
        if f"{name}.dora_scale" in tensors:
            loaded.add(f"{name}.dora_scale")
        for kind, parts in ADAPTER_KEYS.items():
            found = {p: tensors[f"{name}.{p}"] for p in parts if f"{name}.{p}" in tensors}
            if kind == "lora" and "lora_up.weight" not in found:
                continue
            if kind == "loha" and "hada_w1_a" not in found:
                continue
            if found:
                patches[target] = (kind, found, alpha)
                loaded |= {f"{name}.{p}" for p in found}
    return patches, set(tensors) - loaded


def delta(kind: str, parts: dict[str, torch.Tensor], alpha: float | None, shape) -> torch.Tensor:
    """ComfyUI's ΔW (strength 1) for one module, reshaped to the base weight's shape."""
    p = {k: v.float() for k, v in parts.items()}
    if kind == "lora":
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        assert "lora_mid.weight" not in p, "lora_mid (Tucker) is not written by lorafuse"
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale
    if kind == "loha":
        assert "hada_t1" not in p
        scale = alpha / p["hada_w1_b"].shape[0] if alpha is not None else 1.0
        return ((p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])).reshape(shape) * scale
    dim = None
    w1, w2 = p.get("lokr_w1"), p.get("lokr_w2")
    if w1 is None:
        dim = p["lokr_w1_b"].shape[0]
        w1 = p["lokr_w1_a"] @ p["lokr_w1_b"]
    if w2 is None:
        assert "lokr_t2" not in p
        dim = p["lokr_w2_b"].shape[0]
        w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale


def delta_output(org: torch.nn.Module, delta_weight: torch.Tensor, g: torch.Generator):
    """(a random input for the base layer `org`, what a weight change `delta_weight` adds to its output): the
    reference a network's forward difference `org(x) - org_forward(x)` is compared with."""
    import torch.nn.functional as F

    if isinstance(org, torch.nn.Conv2d):
        x = torch.randn(1, org.in_channels, 8, 8, generator=g)
        return x, F.conv2d(x, delta_weight, None, org.stride, org.padding, org.dilation, org.groups)
    x = torch.randn(3, org.in_features, generator=g)
    return x, F.linear(x, delta_weight)
