"""Pieces the built-in fusion methods share: where each LoRA key lands, splitting a LoRA into the part a method
switches and the part it simply adds, and the checks every plan makes first.

Notation (docs/algorithms.md §0): `delta_c` is ΔW_c = s_c B_c A_c, `delta_s` is ΔW_s, `w_c` / `w_s` the user weights.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable

import torch

from lorafuse.errors import LoraFormatError, UserInputError
from lorafuse.families import FAMILIES
from lorafuse.lora.merge import fuse_into, is_fused, merge_loras, unfuse
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import ModuleRef
from lorafuse.lora.validate import LoraCoverageWarning, validate_lora

# The projections K-LoRA chooses between (docs/algorithms.md §2.1): every attention module's to_q / to_k / to_v / to_out.0,
# self- and cross-attention alike; in FLUX's double blocks also the text stream's add_q/k/v_proj, to_add_out.
_ATTENTION_PROJECTION = re.compile(r"(^|\.)(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)$")
# diffusers registers up_blocks before mid_block, so named_modules() is not the order the forward calls them
_BLOCK_ORDER = {"conv_in": 0, "down_blocks": 1, "mid_block": 2, "up_blocks": 3}
DENOISERS = frozenset(f.denoiser_component for f in FAMILIES.values())  # "unet", "transformer"


def lora_label(state: LoraState, role: str) -> str:
    """The file name when there is one (errors name the file), else the role ("content LoRA")."""
    return state.source_path or f"{role} LoRA"


def is_denoiser(ref: ModuleRef) -> bool:
    """The module is in the denoiser (UNet or transformer), not a text encoder."""
    return ref.component in DENOISERS


def is_attention_projection(ref: ModuleRef) -> bool:
    return is_denoiser(ref) and bool(_ATTENTION_PROJECTION.search(ref.path))


def forward_order(pipe: object, refs: Iterable[ModuleRef]) -> list[ModuleRef]:
    """`refs` in the order a UNet forward reaches them (down, mid, up blocks; module order inside a block).

    diffusers registers `up_blocks` before `mid_block`, so `named_modules()` alone is not the call order.
    Text-encoder modules come last."""
    from lorafuse.lora.targets import components_of

    comps = components_of(pipe)
    unet = next((comps[c] for c in DENOISERS if c in comps), None)
    position = {path: i for i, (path, _) in enumerate(unet.named_modules())} if unet is not None else {}

    def key(ref: ModuleRef) -> tuple[int, int, str]:
        if not is_denoiser(ref):
            return (9, 0, f"{ref.component}.{ref.path}")
        return (_BLOCK_ORDER.get(ref.path.split(".", 1)[0], 4), position.get(ref.path, 0), ref.path)

    return sorted(refs, key=key)


def resolve(pipe: object, state: LoraState, arch: str | None = None) -> dict[str, ModuleRef]:
    """LoRA key -> the module it lands on in `pipe` (validated: no match or wrong shapes are errors)."""
    from lorafuse.lora.inject import pipeline_arch

    with warnings.catch_warnings():
        # the API warns once about partial coverage before planning; do not repeat it per method
        warnings.simplefilter("ignore", LoraCoverageWarning)
        report = validate_lora(state, pipe, arch=arch or pipeline_arch(pipe))
    return report.targets


def split_state(state: LoraState, keep: Iterable[str]) -> LoraState:
    """The modules of `state` named in `keep`, with the file's name and kohya spellings (for messages)."""
    keep = set(keep)
    return LoraState(
        modules={k: m for k, m in state.modules.items() if k in keep},
        metadata=dict(state.metadata),
        source_format=state.source_format,
        source_path=state.source_path,
        source_names={k: v for k, v in state.source_names.items() if k in keep},
    )


def check_finite(state: LoraState, role: str) -> None:
    for key, module in state.modules.items():
        for name in ("down", "up", "delta"):
            t = getattr(module, name)
            if t is not None and not torch.isfinite(t).all():
                raise LoraFormatError(
                    f"{lora_label(state, role)}: module {state.source_names.get(key, key)} has non-finite values "
                    f"(NaN/inf) in {name}; the LoRA is damaged, refusing to fuse it"
                )


def require_clean_base(pipe: object, method: str) -> None:
    """Methods restore the base exactly on close; that needs a base with nothing fused or injected already."""
    from lorafuse.lora.inject import adapter_names

    names = adapter_names(pipe)
    if names:
        raise UserInputError(
            f"{method}: the pipeline already holds LoRA adapters {names}; fusion needs the plain base model "
            "(close the previous plan, or delete_adapter them first)"
        )
    if is_fused(pipe):
        raise UserInputError(
            f"{method}: the pipeline already has LoRA weights fused into it; call unfuse(pipe) or close the "
            "previous plan first"
        )


def fuse_sum(
    pipe: object, parts: list[tuple[LoraState, float]], undo: list[Callable[[], None]]
) -> dict[str, object]:
    """Fuse ΔW = Σ w_i ΔW_i of `parts` into the base weights, exactly (one rank-concatenated LoRA, docs/algorithms.md §1).

    Appends `unfuse` to `undo`. Parts without modules or with weight 0 add nothing. Returns a record entry.
    """
    parts = [(s, w) for s, w in parts if s.modules and w != 0]
    if not parts:
        return {"fused_modules": 0}
    merged = merge_loras([s for s, _ in parts], [w for _, w in parts])
    # merged keys are canonical; carry the kohya spellings so names resolve as they did for the inputs
    for state, _ in parts:
        for key, name in state.source_names.items():
            merged.source_names.setdefault(key, name)
    merged.source_path = " + ".join(lora_label(s, "fused") for s, _ in parts)
    undo.append(lambda: unfuse(pipe))
    n = fuse_into(pipe, merged, 1.0)
    return {"fused_modules": n, "fused_rank_max": max(m.rank for m in merged.modules.values())}


def raw_delta(module: LoraModule, shape: tuple[int, ...], scaled: bool = True) -> torch.Tensor:
    """ΔW in float32 shaped like the base weight; `scaled=False` drops alpha / r (the official K-LoRA code
    multiplies up @ down without it, docs/algorithms.md §2.1). Dense (LoHa / LoKr) updates have no separate scale."""
    if scaled or module.down is None:
        return module.delta_weight(shape)
    return LoraModule(down=module.down, up=module.up, alpha=None).delta_weight(shape)


def layer_factors(module: LoraModule, layer: torch.nn.Module, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B') in float32 in the layer's own layout, B' = w · s · B, so the layer's update is B' A x (ZipLoRA's
    and SSR-Merge's forward hooks). Dense updates (LoHa / LoKr) are factorized exactly first; a 2-D LoRA on a 1x1
    conv (SD1.5 proj_in) gets conv shapes, a 1x1-conv LoRA on a Linear flat ones."""
    from lorafuse.lora.resize import factorize

    if module.down is None:
        module = factorize(module.delta)
    down, up = module.down.float(), (weight * module.scale) * module.up.float()
    if isinstance(layer, torch.nn.Conv2d) and down.dim() == 2:
        down, up = down[:, :, None, None], up[:, :, None, None]
    elif isinstance(layer, torch.nn.Linear) and down.dim() == 4:
        down, up = down.flatten(1), up.flatten(1)
    return down, up
