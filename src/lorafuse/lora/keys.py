"""Module names: canonical keys <-> kohya names, both SDXL UNet namings, both text-encoder spellings.

Canonical key = component + "." + diffusers module path, with the text-encoder `text_model.` level always
present (state.py). Kohya names flatten a path with "_" (`lora_unet_down_blocks_0_resnets_0_conv1`), which is
ambiguous (`to_out_0` could be `to.out.0` or `to_out.0`), so names are never un-flattened by string rules:
`KeyIndex` is built from a set of real module names and maps every accepted spelling back by exact lookup.

SDXL kohya files use the original (SGM / LDM) UNet block names; `unet_to_sgm` / `sgm_to_unet` translate them.
Layout (L = layers_per_block; SD1.5 and SDXL both have L = 2):
    conv_in                          <-> input_blocks.0.0
    down_blocks.b.resnets.j          <-> input_blocks.{1 + b(L+1) + j}.0
    down_blocks.b.attentions.j       <-> input_blocks.{1 + b(L+1) + j}.1
    down_blocks.b.downsamplers.0.conv<-> input_blocks.{1 + b(L+1) + L}.0.op
    mid_block.resnets.0 / attentions.0 / resnets.1 <-> middle_block.0 / .1 / .2
    up_blocks.b.resnets.j            <-> output_blocks.{b(L+1) + j}.0          (j = 0..L)
    up_blocks.b.attentions.j         <-> output_blocks.{b(L+1) + j}.1
    up_blocks.b.upsamplers.0.conv    <-> output_blocks.{b(L+1) + L}.{2 if the block has attention else 1}.conv
    resnet conv1 / time_emb_proj / conv2 / conv_shortcut <-> in_layers.2 / emb_layers.1 / out_layers.3 /
    skip_connection; attention internals (proj_in, transformer_blocks..., proj_out) keep their names.
    time_embedding.linear_1/2 <-> time_embed.0/2; add_embedding.linear_1/2 <-> label_emb.0.0/0.2;
    conv_norm_out / conv_out <-> out.0 / out.2
(Checked against diffusers `_maybe_map_sgm_blocks_to_diffusers` / `_convert_unet_lora_key` and kohya's
`convert_ldm_unet_checkpoint`; tests/lora/test_keys.py compares with diffusers' converter module by module.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lorafuse.errors import LoraFormatError
from lorafuse.families import NAMES, get_family

ARCHS = NAMES  # the registered base-model families
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS_ORDER = ("unet", "transformer", "text_encoder", "text_encoder_2")

# Prefixes we read. `lora_te_` and `lora_te1_` both mean the first text encoder. `lora_transformer_` is the
# kohya-style spelling of diffusers' FLUX.1 module names that some trainers write (diffusers reads it too).
KOHYA_READ_PREFIXES = {
    "lora_unet_": "unet",
    "lora_transformer_": "transformer",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_2",  # FLUX.1: kohya numbers T5-XXL third (CLIP-L is lora_te1_)
    "lora_te_": "text_encoder",
}


def kohya_write_prefixes(arch: str) -> dict[str, str]:
    """Component -> kohya prefix of the family's files (SDXL numbers its two text encoders: lora_te1_, lora_te2_)."""
    return dict(get_family(arch).kohya_prefixes)


def split_key(key: str) -> tuple[str, str]:
    """'unet.down_blocks.0...' -> ('unet', 'down_blocks.0...')."""
    component, _, path = key.partition(".")
    if not path:
        raise ValueError(f"LoRA key {key!r} has no component prefix (unet., text_encoder., ...)")
    return component, path


def flat(path: str) -> str:
    return path.replace(".", "_")


# --- text encoders ---------------------------------------------------------------------------------------


def te_canonical_path(path: str) -> str:
    """Add the `text_model.` level that transformers 5 `CLIPTextModel` dropped (and every kohya file keeps).

    `text_projection` (CLIPTextModelWithProjection) sits beside `text_model`, never inside it.
    """
    if path.startswith("text_model.") or path == "text_projection":
        return path
    return "text_model." + path


def te_spellings(canonical_path: str) -> list[str]:
    """Both spellings of a text-encoder module: with and without `text_model.`."""
    paths = [canonical_path]
    if canonical_path.startswith("text_model."):
        paths.append(canonical_path[len("text_model.") :])
    return paths


def canonical_key(component: str, path: str) -> str:
    if component in TEXT_ENCODERS:
        path = te_canonical_path(path)
    return f"{component}.{path}"


# --- UNet: diffusers <-> SGM ------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnetLayout:
    """What the SGM block numbering depends on: resnets per down block, and which up blocks have attention
    (the upsampler's slot inside an output block is 2 after an attention, else 1)."""

    layers_per_block: int = 2
    up_block_has_attention: tuple[bool, ...] = ()

    @classmethod
    def from_config(cls, config: Mapping) -> UnetLayout:
        lpb = config["layers_per_block"]
        if not isinstance(lpb, int):
            # per-block lists exist in diffusers; SGM numbering is only defined for a single value
            if len(set(lpb)) != 1:
                raise LoraFormatError(f"SGM block names need one layers_per_block, this UNet has {list(lpb)}")
            lpb = lpb[0]
        has_attn = tuple("CrossAttn" in t or "Attn" in t for t in config["up_block_types"])
        return cls(int(lpb), has_attn)


SD15_LAYOUT = UnetLayout(2, (False, True, True, True))
SDXL_LAYOUT = UnetLayout(2, (True, True, False))

_TOP_TO_SGM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_TOP_FROM_SGM = {v: k for k, v in _TOP_TO_SGM.items()}
_RESNET_TO_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_FROM_SGM = {v: k for k, v in _RESNET_TO_SGM.items()}
_MID_TO_SGM = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}
_MID_FROM_SGM = {v: k for k, v in _MID_TO_SGM.items()}

_BLOCK_RE = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.+))?$"
)
_MID_RE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?$")
_SGM_RE = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)(?:\.(.+))?$")
_SGM_MID_RE = re.compile(r"^middle_block\.(\d+)(?:\.(.+))?$")


def _resnet_rest(rest: str | None, table: dict[str, str]) -> str | None:
    """A resnet's inner path renamed by `table` (_RESNET_TO_SGM or _RESNET_FROM_SGM), with its leading dot; ""
    for the resnet itself; None when no entry names it."""
    if rest is None:
        return ""
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return "." + new + rest[len(old) :]
    return None


def unet_to_sgm(path: str, layout: UnetLayout) -> str | None:
    """Diffusers UNet module path -> SGM path, or None if it has no SGM name."""
    for top, sgm in _TOP_TO_SGM.items():
        if path == top or path.startswith(top + "."):
            return sgm + path[len(top) :]
    n = layout.layers_per_block + 1
    m = _MID_RE.match(path)
    if m:
        kind, idx, rest = m.groups()
        head = _MID_TO_SGM.get(f"{kind}.{idx}")
        if head is None:
            return None
        if kind == "resnets":
            tail = _resnet_rest(rest, _RESNET_TO_SGM)
            return None if tail is None else head + tail
        return head + ("." + rest if rest else "")
    m = _BLOCK_RE.match(path)
    if not m:
        return None
    side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if side == "down_blocks":
        if kind == "downsamplers":
            if j != 0 or rest != "conv":
                return None
            return f"input_blocks.{1 + b * n + layout.layers_per_block}.0.op"
        head = f"input_blocks.{1 + b * n + j}"
    else:
        if kind == "upsamplers":
            if j != 0 or rest != "conv":
                return None
            if b >= len(layout.up_block_has_attention):
                return None
            slot = 2 if layout.up_block_has_attention[b] else 1
            return f"output_blocks.{b * n + layout.layers_per_block}.{slot}.conv"
        head = f"output_blocks.{b * n + j}"
    if kind == "resnets":
        tail = _resnet_rest(rest, _RESNET_TO_SGM)
        return None if tail is None else f"{head}.0{tail}"
    return f"{head}.1" + ("." + rest if rest else "")


def sgm_to_unet(path: str, layout: UnetLayout) -> str | None:
    """SGM UNet module path -> diffusers path, or None if it is not an SGM UNet name."""
    for sgm, top in _TOP_FROM_SGM.items():
        if path == sgm or path.startswith(sgm + "."):
            return top + path[len(sgm) :]
    L = layout.layers_per_block
    n = L + 1
    m = _SGM_MID_RE.match(path)
    if m:
        head = _MID_FROM_SGM.get(f"middle_block.{m.group(1)}")
        rest = m.group(2)
        if head is None:
            return None
        if head.startswith("resnets"):
            tail = _resnet_rest(rest, _RESNET_FROM_SGM)
            return None if tail is None else f"mid_block.{head}{tail}"
        return f"mid_block.{head}" + ("." + rest if rest else "")
    m = _SGM_RE.match(path)
    if not m:
        return None
    side, i, slot, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if side == "input_blocks":
        if i == 0:
            return None  # input_blocks.0.0 (conv_in) is handled by the table above
        b, j = divmod(i - 1, n)
        if j == L:
            return f"down_blocks.{b}.downsamplers.0.conv" if (slot == 0 and rest == "op") else None
        kind_head = f"down_blocks.{b}"
    else:
        b, j = divmod(i, n)
        if rest == "conv" and slot in (1, 2):
            # an attention block has no direct `conv` child, so `.conv` in slot 1 or 2 is the upsampler
            return f"up_blocks.{b}.upsamplers.0.conv" if j == L else None
        kind_head = f"up_blocks.{b}"
    if slot == 0:
        tail = _resnet_rest(rest, _RESNET_FROM_SGM)
        return None if tail is None else f"{kind_head}.resnets.{j}{tail}"
    if slot == 1:
        return f"{kind_head}.attentions.{j}" + ("." + rest if rest else "")
    return None


def is_sgm_path(path: str) -> bool:
    return path.startswith(
        ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
    )


# --- writing names ----------------------------------------------------------------------------------------


def kohya_name(key: str, arch: str, layout: UnetLayout | None = None) -> str:
    """Canonical key -> kohya module name (without the `.lora_down.weight` suffix)."""
    component, path = split_key(key)
    prefixes = kohya_write_prefixes(arch)
    if component not in prefixes:
        raise LoraFormatError(
            f"{key}: component {component!r} has no kohya prefix for arch {arch!r} "
            f"(kohya {arch} files have {', '.join(prefixes)})"
        )
    if component == "unet" and get_family(arch).kohya_sgm_unet:
        sgm = unet_to_sgm(path, layout or SDXL_LAYOUT)
        if sgm is None:
            raise LoraFormatError(f"{key}: no SGM (kohya SDXL) name for this UNet module")
        path = sgm
    elif component in TEXT_ENCODERS:
        path = te_canonical_path(path)
        if path.startswith("text_model.encoder.block."):  # T5 (FLUX.1's lora_te3_): kohya names it without it
            path = path.removeprefix("text_model.")
    return prefixes[component] + flat(path)


# --- reading names ----------------------------------------------------------------------------------------


class KeyIndex:
    """Exact lookup from any accepted spelling of a module name to its canonical key.

    Built from real module names (a model's, or the reference list of an architecture). Spellings per module:
    the flattened diffusers path, the flattened SGM path (UNet, when a layout is known) and, for text encoders,
    the path with and without `text_model.`. A spelling shared by two different modules is ambiguous and
    never resolved silently.
    """

    _AMBIGUOUS = "\0ambiguous"

    def __init__(self, keys: Iterable[str], layout: UnetLayout | None = None):
        self.layout = layout
        self.keys: set[str] = set()
        self._flat: dict[tuple[str, str], str] = {}
        self._vocab: set[str] = set()
        for key in keys:
            self.add(key)

    def add(self, key: str) -> None:
        component, path = split_key(key)
        self.keys.add(key)
        spellings = [path]
        if component == "unet" and self.layout is not None:
            sgm = unet_to_sgm(path, self.layout)
            if sgm is not None:
                spellings.append(sgm)
        if component in TEXT_ENCODERS:
            spellings = te_spellings(path)
        for spelling in spellings:
            slot = (component, flat(spelling))
            old = self._flat.get(slot)
            self._flat[slot] = key if old in (None, key) else self._AMBIGUOUS
            self._vocab.update(seg for seg in spelling.split(".") if "_" in seg)

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def lookup_flat(self, component: str, flat_path: str) -> str | None:
        found = self._flat.get((component, flat_path))
        if found == self._AMBIGUOUS:
            raise LoraFormatError(f"{component} module name {flat_path!r} matches more than one module")
        return found

    def from_kohya(self, name: str) -> str | None:
        """'lora_unet_input_blocks_4_1_proj_in' -> 'unet.down_blocks.1.attentions.0.proj_in' (None if unknown)."""
        component, rest = split_kohya_prefix(name)
        return self.lookup_flat(component, rest)

    def resolve(self, key: str) -> str | None:
        """A canonical-looking key (maybe from another model's naming) -> the key of this index, or None."""
        if key in self.keys:
            return key
        component, path = split_key(key)
        return self.lookup_flat(component, flat(path))

    def guess_path(self, component: str, flat_path: str) -> str:
        """Best-effort un-flattening for names outside the index (another architecture, our world model).

        Greedy longest match against the underscore-containing segment names seen in the index, then SGM ->
        diffusers. Only a guess: validation re-resolves every key against the real model by exact lookup.
        """
        vocab = self._vocab | _SGM_VOCAB
        tokens = flat_path.split("_")
        segments: list[str] = []
        i = 0
        while i < len(tokens):
            for j in range(len(tokens), i + 1, -1):
                if "_".join(tokens[i:j]) in vocab:
                    segments.append("_".join(tokens[i:j]))
                    i = j
                    break
            else:
                segments.append(tokens[i])
                i += 1
        path = ".".join(segments)
        if component == "unet" and is_sgm_path(path):
            path = sgm_to_unet(path, self.layout or UnetLayout(2, ())) or path
        return path


_SGM_VOCAB = {
    "input_blocks",
    "middle_block",
    "output_blocks",
    "in_layers",
    "out_layers",
    "emb_layers",
    "skip_connection",
    "time_embed",
    "label_emb",
}


def split_kohya_prefix(name: str) -> tuple[str, str]:
    for prefix, component in KOHYA_READ_PREFIXES.items():
        if name.startswith(prefix):
            return component, name[len(prefix) :]
    raise LoraFormatError(f"{name!r} does not start with a kohya prefix ({', '.join(KOHYA_READ_PREFIXES)})")


class NameResolver:
    """Resolves kohya names against one or more indices (a real model's, or the reference architectures')."""

    def __init__(self, indices: list[KeyIndex]):
        if not indices:
            raise ValueError("NameResolver needs at least one KeyIndex")
        self.indices = indices
        # names found in no index: resolved by guess_path; validation re-resolves them against the base
        self.guessed: list[str] = []
        self.resolved: dict[str, str] = {}  # kohya name -> canonical key

    def kohya(self, name: str) -> str:
        component, rest = split_kohya_prefix(name)
        for index in self.indices:
            hit = index.lookup_flat(component, rest)
            if hit is not None:
                self.resolved[name] = hit
                return hit
        self.guessed.append(name)
        key = canonical_key(component, self.indices[0].guess_path(component, rest))
        self.resolved[name] = key
        return key
