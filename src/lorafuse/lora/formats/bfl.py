"""FLUX.1 LoRA files named after Black Forest Labs' original model (read only; we write kohya or diffusers).

- ComfyUI / BFL: `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight` / `.lora_B.weight` (also
  `lora_down` / `lora_up`, an optional `.alpha`; fal's trainer writes the `base_model.model.` prefix instead, and
  some files have no prefix). ComfyUI stores CLIP-L as `text_encoders.clip_l.transformer.<module>` and T5-XXL as
  `text_encoders.t5xxl.transformer.<module>` (diffusers 0.42 drops T5 LoRA keys with a log line; we apply them).
- XLabs (x-flux): `double_blocks.0.processor.qkv_lora1.down.weight` (image stream; `…2` is the text stream),
  `proj_lora1/2`, and on single blocks `qkv_lora` / `proj_lora`. No alpha: scale 1 (diffusers reads it so too).
  A single block's `qkv_lora` adds to the q, k, v rows of `linear1` only (x-flux `SingleStreamBlockLoraProcessor`
  splits linear1's output before adding it), so here it is `linear1` with zero MLP rows.
Module paths go through `flux_keys`, which splits fused Linears exactly.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from lorafuse.errors import LoraFormatError
from lorafuse.families.flux import MLP_RATIO
from lorafuse.lora.flux_keys import COMPONENT, bfl_target, from_bfl
from lorafuse.lora.formats.common import DAMAGED, lora_pair
from lorafuse.lora.keys import canonical_key
from lorafuse.lora.state import LoraModule, LoraState

_PREFIXES = ("diffusion_model.", "base_model.model.")
# ComfyUI's text-encoder prefixes -> the FluxPipeline component
_TE_PREFIXES = {"text_encoders.clip_l.transformer.": "text_encoder", "text_encoders.t5xxl.transformer.": "text_encoder_2"}
_PART = re.compile(
    r"^(?P<mod>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha)$"
)
_ROLE = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up"}
_XLABS = re.compile(
    r"^(?:diffusion_model\.)?(?P<kind>double_blocks|single_blocks)\.(?P<i>\d+)\.processor\."
    r"(?P<proj>qkv|proj)_lora(?P<stream>[12]?)\.(?P<role>down|up)\.weight$"
)
_XLABS_TARGET = {
    ("double_blocks", "qkv", "1"): "img_attn.qkv",
    ("double_blocks", "qkv", "2"): "txt_attn.qkv",
    ("double_blocks", "proj", "1"): "img_attn.proj",
    ("double_blocks", "proj", "2"): "txt_attn.proj",
    ("single_blocks", "qkv", ""): "linear1",
    ("single_blocks", "proj", ""): "linear2",
}


def parse_key(key: str) -> tuple[str, str, str, str] | None:
    """key -> (component, module path, role down|up|alpha, layout) or None. Transformer paths are BFL's."""
    m = _XLABS.match(key)
    if m:
        sub = _XLABS_TARGET.get((m.group("kind"), m.group("proj"), m.group("stream")))
        if sub is None:
            return None
        return COMPONENT, f"{m.group('kind')}.{m.group('i')}.{sub}", m.group("role"), "xlabs"
    m = _PART.match(key)
    if not m:
        return None
    module, part = m.group("mod"), m.group("part")
    role = _ROLE.get(part, "alpha")
    for prefix, component in _TE_PREFIXES.items():
        if module.startswith(prefix):
            return component, module[len(prefix) :], role, "comfyui"
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix) :]
            break
    if bfl_target(module) is None:
        return None
    return COMPONENT, module, role, "comfyui"


def is_bfl_key(key: str) -> bool:
    return parse_key(key) is not None


def _xlabs_single_qkv(module: LoraModule) -> LoraModule:
    """qkv_lora (3d rows) -> the same update on linear1 (3d + 4d rows): the MLP rows are zero."""
    d = module.down.shape[1]
    up = torch.cat([module.up, module.up.new_zeros((MLP_RATIO * d, module.up.shape[1]))])
    return LoraModule(down=module.down, up=up, alpha=module.alpha)


def read(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> LoraState:
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    layouts: dict[str, str] = {}  # BFL path -> layout
    for key, tensor in tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            raise LoraFormatError(f"{source}: key {key!r} is not a ComfyUI / BFL / XLabs FLUX.1 LoRA key")
        component, path, role, layout = parsed
        if role in parts[component, path]:
            raise LoraFormatError(f"{source}: module {path} has two '{role}' tensors (second: {key})")
        parts[component, path][role] = tensor
        layouts[path] = layout

    fused: dict[str, LoraModule] = {}
    modules: dict[str, LoraModule] = {}
    for (component, path), roles in parts.items():
        where = f"{source}: {path}"
        if "down" not in roles or "up" not in roles:
            raise LoraFormatError(f"{where}: needs both down (A) and up (B), has {', '.join(sorted(roles))}; {DAMAGED}")
        alpha = float(roles["alpha"].item()) if "alpha" in roles else None
        module = lora_pair(roles["down"], roles["up"], alpha, where)
        if component != COMPONENT:
            modules[canonical_key(component, path)] = module
            continue
        if layouts[path] == "xlabs" and path.startswith("single_blocks.") and path.endswith("linear1"):
            module = _xlabs_single_qkv(module)
        fused[path] = module
    modules.update(from_bfl(fused, source))
    fmt = "xlabs" if set(layouts.values()) == {"xlabs"} else "comfyui"
    return LoraState(modules=modules, metadata=dict(metadata), source_format=fmt, source_path=source)
