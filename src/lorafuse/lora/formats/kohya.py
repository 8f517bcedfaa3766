"""kohya / LyCORIS files: `<prefix><flattened module path>.<part>`.

Parts: `lora_down.weight`, `lora_up.weight`, `alpha` (kohya LoRA and LyCORIS LoCon, conv included),
`lora_mid.weight` (LoCon Tucker core), `hada_*` (LoHa), `lokr_*` (LoKr). Prefixes in keys.py.
Writing produces plain kohya LoRA: the only layout A1111, ComfyUI, kohya and diffusers all load.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter, defaultdict

import torch

from lorafuse.errors import LoraFormatError
from lorafuse.families import get_family
from lorafuse.lora.checks import warn_missing_alpha
from lorafuse.lora.flux_keys import bfl_from_flat, from_bfl, to_bfl
from lorafuse.lora.formats.common import effective_alpha, lora_pair, require_low_rank
from lorafuse.lora.formats.lycoris import LOHA_PARTS, LOKR_PARTS, locon_tucker_delta, loha_delta, lokr_delta
from lorafuse.lora.keys import KOHYA_READ_PREFIXES, NameResolver, UnetLayout, flat, kohya_name, split_key
from lorafuse.lora.state import LoraModule, LoraState

LORA_PARTS = {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"}
UNSUPPORTED_PARTS = {
    "dora_scale": "DoRA (`dora_scale`) needs the base weight's column norms at apply time",
    "diff": "LyCORIS full fine-tune (`diff`)",
    "diff_b": "LyCORIS full fine-tune bias (`diff_b`)",
    "on_input": "LyCORIS IA3",
    "oft_blocks": "LyCORIS OFT",
    "oft_diag": "LyCORIS OFT",
    "a1.weight": "LyCORIS GLoRA",
    "lora_down.bias": "LoRA with bias",
}


KOHYA_FLUX_PREFIX = "lora_unet_"  # kohya sd-scripts names FLUX.1 transformer modules like UNet ones


def is_kohya_key(key: str) -> bool:
    return key.startswith(tuple(KOHYA_READ_PREFIXES))


def _group(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        groups[name][part] = tensor
    return groups


def _explain_malformed(source: str, tensors: dict[str, torch.Tensor], bad: list[str]) -> LoraFormatError:
    """Keys that start like kohya but do not split into <module>.<part>: say what is wrong and refuse."""
    problems = []
    joined = [k for k in bad if k.endswith(("_lora_down.weight", "_lora_up.weight", "_lora.down.weight"))]
    if joined:
        problems.append(
            f"the module name and the LoRA part are joined with '_' instead of '.' (`{joined[0]}`; "
            "kohya writes `<module>.lora_down.weight`)"
        )
    doubled = [k for k in tensors if k.startswith(("lora_unet_unet_", "lora_te_text_encoder_"))]
    if doubled:
        problems.append(f"the component prefix is doubled (`{doubled[0][:24]}…`)")
    if not any(k.endswith(".alpha") for k in tensors):
        problems.append("there is no `.alpha` entry at all")
    if joined and doubled:
        problems.append(
            "it looks like a diffusers-format file (`unet.<module>.lora.down.weight`) whose dots were all "
            "replaced by '_'"
        )
    detail = "; ".join(problems) if problems else f"e.g. {bad[0]!r}"
    return LoraFormatError(
        f"{source}: not a valid kohya LoRA. {len(bad)} of {len(tensors)} keys look like kohya names "
        f"(`lora_unet_…`) but are malformed: {detail}. A1111, ComfyUI and kohya would match none of these "
        "keys and apply nothing without an error; lorafuse refuses instead of guessing. "
        "Re-export the LoRA from the tool that trained it (kohya or diffusers format)."
    )


def read(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], resolver: NameResolver, source: str
) -> LoraState:
    groups = _group(tensors)
    malformed = [
        f"{name}.{part}"
        for name, parts in groups.items()
        for part in parts
        if part not in LORA_PARTS | LOHA_PARTS | LOKR_PARTS | set(UNSUPPORTED_PARTS)
    ]
    if malformed:
        raise _explain_malformed(source, tensors, malformed)

    modules: dict[str, LoraModule] = {}
    names: dict[str, str] = {}  # canonical key -> name in the file
    flux: dict[str, LoraModule] = {}  # BFL path -> module (FLUX.1 names, split into diffusers modules below)
    flux_names: dict[str, str] = {}
    kinds: set[str] = set()
    for name, parts in groups.items():
        where = f"{source}: {name}"
        module, kind = _module(parts, where)
        kinds.add(kind)
        bfl = bfl_from_flat(name.removeprefix("lora_unet_")) if name.startswith("lora_unet_") else None
        if bfl is not None:
            flux[bfl], flux_names[bfl] = module, name
            continue
        key = resolver.kohya(name)
        if key in modules:
            raise LoraFormatError(f"{where}: a second spelling of module {key} (file has both namings?)")
        modules[key], names[key] = module, name
    for bfl, module in flux.items():
        for key, piece in from_bfl({bfl: module}, source).items():
            modules[key], names[key] = piece, flux_names[bfl]

    if len(kinds) > 1:
        kinds.discard("kohya")  # LoCon files mix plain pairs and Tucker modules; LoHa/LoKr name the file
    fmt = kinds.pop() if len(kinds) == 1 else "lycoris_mixed"
    if fmt == "kohya" and metadata.get("ss_network_module", "").startswith("lycoris"):
        fmt = "lycoris_locon"
    warn_missing_alpha(
        [n for n, p in groups.items() if "alpha" in p], [n for n, p in groups.items() if "alpha" not in p], source
    )
    return LoraState(
        modules=modules, metadata=dict(metadata), source_format=fmt, source_path=source, source_names=names
    )


def _module(parts: dict[str, torch.Tensor], where: str) -> tuple[LoraModule, str]:
    """One module's tensors -> (its LoraModule, the kind of file it comes from)."""
    for part, why in UNSUPPORTED_PARTS.items():
        if part in parts:
            raise LoraFormatError(f"{where}: {why} is not supported by lorafuse")
    empty = sorted(k for k, v in parts.items() if k != "alpha" and v.numel() == 0)
    if empty:  # rank 0 or an empty layer: the scale alpha / rank would divide by zero
        shapes = ", ".join(f"{k} {tuple(parts[k].shape)}" for k in empty)
        raise LoraFormatError(
            f"{where}: empty factor ({shapes}); a LoRA module needs rank >= 1 and non-empty layers. The file is "
            "damaged; remove the module or re-export the LoRA."
        )
    alpha_t = parts.get("alpha")
    # kohya's convention: a zero alpha means none (alpha = rank); checks.py has warned about it
    alpha = (float(alpha_t.item()) or None) if alpha_t is not None else None
    try:
        if parts.keys() & (LOHA_PARTS - {"alpha"}):
            return LoraModule(delta=loha_delta(parts, where)), "lycoris_loha"
        if parts.keys() & (LOKR_PARTS - {"alpha"}):
            return LoraModule(delta=lokr_delta(parts, where)), "lycoris_lokr"
        if "lora_down.weight" in parts and "lora_up.weight" in parts:
            down, up = parts["lora_down.weight"], parts["lora_up.weight"]
            if "lora_mid.weight" in parts:
                mid = parts["lora_mid.weight"]
                return LoraModule(delta=locon_tucker_delta(down, mid, up, alpha)), "lycoris_locon"
            return lora_pair(down, up, alpha, where), "kohya"
    except (RuntimeError, IndexError, ArithmeticError) as e:  # torch's own shape errors when LyCORIS parts do not fit together
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(parts.items()) if k != "alpha")
        raise LoraFormatError(
            f"{where}: the parts of this module do not fit together ({shapes}): {str(e).splitlines()[0]}. "
            "The file is damaged or was written by a tool lorafuse does not know."
        ) from e
    raise LoraFormatError(
        f"{where}: incomplete module, has only {', '.join(sorted(parts))}; the file is damaged or was cut short"
    )


def with_uniform_alpha(state: LoraState) -> LoraState:
    """The same ΔW with one alpha A for every module: alpha_m / A is folded into that module's `lora_up`.

    diffusers (checked on 0.42) applies a single alpha to the attention modules of a kohya file (the
    alpha_pattern keys it builds for them never match a module), so per-module alphas load at the wrong
    scale there; A1111, ComfyUI and kohya read them correctly. One alpha is right everywhere. Exact up to one
    rounding of `up`; a state whose alphas already agree is returned unchanged (bit-identical round trips).
    """
    alphas = [effective_alpha(m) for m in state.modules.values() if m.down is not None]
    if len(set(alphas)) <= 1:
        return state
    common = Counter(alphas).most_common(1)[0][0]
    modules = {}
    for key, module in state.modules.items():
        alpha = effective_alpha(module) if module.down is not None else common
        if alpha == common:
            modules[key] = module
            continue
        up = (module.up.float() * (alpha / common)).to(module.up.dtype)
        modules[key] = LoraModule(down=module.down, up=up, alpha=common)
    return dataclasses.replace(state, modules=modules)


def _named_modules(
    state: LoraState, arch: str, layout: UnetLayout | None
) -> list[tuple[str, str, LoraModule]]:
    """(what the module is called in messages, kohya name, module); FLUX.1 transformer pieces fused first."""
    source = state.source_path or "LoRA"
    flux_keys = {k: m for k, m in state.modules.items() if split_key(k)[0] == "transformer"}
    if flux_keys and "transformer" not in get_family(arch).kohya_prefixes:
        label = get_family(arch).label
        raise LoraFormatError(f"{source}: FLUX.1 transformer modules cannot be written as a kohya {label} file")
    named = [(bfl, KOHYA_FLUX_PREFIX + flat(bfl), m) for bfl, m in to_bfl(flux_keys, source).items()]
    outside = sorted(bfl for bfl, _, _ in named if not bfl.startswith(("double_blocks.", "single_blocks.")))
    if outside:
        # diffusers (checked on 0.42) converts these kohya names to keys without the `transformer.` prefix and
        # then drops them without a word; kohya and ComfyUI apply them
        warnings.warn(
            f"{source}: {len(outside)} FLUX.1 modules outside the double / single blocks ({', '.join(outside[:3])}) "
            "are written under kohya names that diffusers' loader (0.42) silently skips; save in the diffusers "
            "format for a file diffusers loads fully.",
            UserWarning,
            stacklevel=4,
        )
    for key in sorted(set(state.modules) - set(flux_keys)):
        module = state.modules[key]
        require_low_rank(key, module, "kohya")
        named.append((key, kohya_name(key, arch, layout), module))
    return named


def write(state: LoraState, arch: str, layout: UnetLayout | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for key, name, module in sorted(_named_modules(state, arch, layout), key=lambda t: t[1]):
        if name in owner:
            raise LoraFormatError(f"{key} and {owner[name]} both map to the kohya name {name}")
        owner[name] = key
        out[f"{name}.lora_down.weight"] = module.down.contiguous()
        out[f"{name}.lora_up.weight"] = module.up.contiguous()
        # kohya always stores alpha; float32 keeps every alpha a LoRA realistically uses exact
        out[f"{name}.alpha"] = torch.tensor(effective_alpha(module), dtype=torch.float32)
    return out
