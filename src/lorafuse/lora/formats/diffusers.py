"""diffusers-side files, read in all three historical layouts; written in the PEFT layout.

- attention-processor (diffusers < 0.21): `down_blocks.0…attn1.processor.to_q_lora.down.weight`, no component
  prefix, `to_out_lora` meaning `to_out.0` (UNet) or `out_proj` (text encoder).
- diffusers LoRA: `unet.<module>.lora.down.weight` / `.lora.up.weight`, text encoders
  `text_encoder.<module>.lora_linear_layer.down.weight`.
- PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (an adapter name may sit before `.weight`); FLUX.1
  files (diffusers' trainer, ai-toolkit, SimpleTuner) use `transformer.<module>.lora_A.weight` the same way.
None of these stores alpha in the keys (scale 1) unless the file has `<module>.alpha` tensors or diffusers'
`lora_adapter_metadata` JSON ({"unet.r", "unet.lora_alpha", "unet.alpha_pattern", …}: a peft LoraConfig per
component), which is how we write non-unit scales so that diffusers' own loader applies them.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

import torch

from lorafuse.errors import LoraFormatError
from lorafuse.lora.formats.common import DAMAGED, effective_alpha, lora_pair, require_low_rank
from lorafuse.lora.keys import COMPONENTS_ORDER, TEXT_ENCODERS, canonical_key, split_key, te_spellings
from lorafuse.lora.state import LoraModule, LoraState

ADAPTER_METADATA_KEY = "lora_adapter_metadata"

_PEFT = re.compile(r"^(?P<mod>.+)\.lora_(?P<role>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_DIFFUSERS = re.compile(r"^(?P<mod>.+)\.lora(?:_linear_layer)?\.(?P<role>down|up)\.weight$")
_ATTNPROC = re.compile(
    r"^(?P<mod>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$"
)
_ALPHA = re.compile(r"^(?P<mod>.+)\.alpha$")
_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_ROLE = {"A": "down", "B": "up", "down": "down", "up": "up"}


def _component(module: str) -> tuple[str, str]:
    module = module.removeprefix("base_model.model.")
    for component in ("text_encoder_2", "text_encoder", "unet", "transformer"):
        if module.startswith(component + "."):
            return component, module[len(component) + 1 :]
    # un-prefixed files (attention-processor era, raw peft) are UNet-only unless the path says otherwise;
    # a UNet's transformer_blocks sit inside attentions, so a path starting with them is a FLUX transformer
    if module.startswith(("transformer_blocks.", "single_transformer_blocks.")):
        return "transformer", module
    return ("text_encoder" if module.startswith("text_model.") else "unet"), module


def parse_key(key: str) -> tuple[str, str, str, str] | None:
    """key -> (canonical module key, role down|up|alpha, layout, adapter name) or None if not diffusers-like."""
    m = _ATTNPROC.match(key)
    if m:
        component, path = _component(m.group("mod"))
        proj = (_TE_PROJ if component in TEXT_ENCODERS else _UNET_PROJ)[m.group("proj")]
        return canonical_key(component, f"{path}.{proj}"), m.group("role"), "diffusers_attnproc", ""
    for pattern, layout in ((_PEFT, "diffusers_peft"), (_DIFFUSERS, "diffusers")):
        m = pattern.match(key)
        if m:
            component, path = _component(m.group("mod"))
            adapter = m.groupdict().get("adapter") or ""
            return canonical_key(component, path), _ROLE[m.group("role")], layout, adapter
    m = _ALPHA.match(key)
    if m and not key.startswith("lora_"):
        component, path = _component(m.group("mod"))
        return canonical_key(component, path), "alpha", "", ""
    return None


def is_diffusers_key(key: str) -> bool:
    return parse_key(key) is not None


def _adapter_configs(metadata: dict[str, str], source: str) -> dict[str, dict]:
    """lora_adapter_metadata -> {component: LoraConfig kwargs}; un-prefixed entries apply to every component."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraFormatError(f"{source}: metadata {ADAPTER_METADATA_KEY} is not valid JSON ({e})") from e
    configs: dict[str, dict] = defaultdict(dict)
    for key, value in data.items():
        component, _, field = key.partition(".")
        if field and component in COMPONENTS_ORDER:
            configs[component][field] = value
        else:
            configs["*"][key] = value
    return configs


def _alpha_from_config(config: dict, key: str) -> float | None:
    """peft's rule: an alpha_pattern entry matches a module when `(.*\\.)?(pattern)$` matches its name."""
    component, path = split_key(key)
    names = te_spellings(path) if component in TEXT_ENCODERS else [path]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if any(re.match(rf"(.*\.)?({pattern})$", name) for name in names):
            return float(value)
    alpha = config.get("lora_alpha")
    return float(alpha) if alpha is not None else None


def read(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> LoraState:
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    layouts: Counter[str] = Counter()
    adapters: set[str] = set()
    for key, tensor in tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            raise LoraFormatError(f"{source}: key {key!r} is not a diffusers / PEFT LoRA key")
        module, role, layout, adapter = parsed
        if role in parts[module]:
            raise LoraFormatError(f"{source}: module {module} has two '{role}' tensors (second: {key})")
        parts[module][role] = tensor
        if layout:
            layouts[layout] += 1
        if role != "alpha":
            adapters.add(adapter)
    if len(adapters) > 1:
        raise LoraFormatError(
            f"{source}: several PEFT adapters in one file ({sorted(adapters)}); save one per file"
        )

    configs = _adapter_configs(metadata, source)
    modules: dict[str, LoraModule] = {}
    for module, roles in parts.items():
        where = f"{source}: {module}"
        if "down" not in roles or "up" not in roles:
            raise LoraFormatError(f"{where}: needs both down (A) and up (B), has {', '.join(sorted(roles))}; {DAMAGED}")
        if "alpha" in roles:
            alpha = float(roles["alpha"].item()) or None  # 0 means none, as in kohya
        else:
            component = module.split(".", 1)[0]
            config = configs.get(component) or configs.get("*") or {}
            alpha = _alpha_from_config(config, module)
        modules[module] = lora_pair(roles["down"], roles["up"], alpha, where)
    fmt = layouts.most_common(1)[0][0] if len(layouts) == 1 else "diffusers_mixed"
    return LoraState(modules=modules, metadata=dict(metadata), source_format=fmt, source_path=source)


def _mode(values: list) -> object:
    return Counter(values).most_common(1)[0][0]


def write(state: LoraState) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT-layout tensors plus the `lora_adapter_metadata` entry that carries every module's rank and alpha."""
    tensors: dict[str, torch.Tensor] = {}
    per_component: dict[str, dict[str, tuple[int, float]]] = defaultdict(dict)
    for key in sorted(state.modules):
        module = state.modules[key]
        require_low_rank(key, module, "diffusers")
        component, path = split_key(key)
        tensors[f"{key}.lora_A.weight"] = module.down.contiguous()
        tensors[f"{key}.lora_B.weight"] = module.up.contiguous()
        # Patterns without `text_model.`: peft matches them as a suffix, so they fit transformers 4 and 5.
        name = te_spellings(path)[-1] if component in TEXT_ENCODERS else path
        per_component[component][name] = (module.rank, effective_alpha(module))

    adapter: dict[str, object] = {}
    for component, entries in per_component.items():
        r = _mode([rank for rank, _ in entries.values()])
        alpha = _mode([a for _, a in entries.values()])
        adapter[f"{component}.r"] = r
        adapter[f"{component}.lora_alpha"] = alpha
        adapter[f"{component}.rank_pattern"] = {re.escape(n): rk for n, (rk, _) in entries.items() if rk != r}
        adapter[f"{component}.alpha_pattern"] = {
            re.escape(n): a for n, (_, a) in entries.items() if a != alpha
        }
        adapter[f"{component}.target_modules"] = sorted(entries)
    return tensors, {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(adapter, indent=2, sort_keys=True)}
