"""FLUX.1 transformer LoRA names: the fused BFL layout (kohya, ComfyUI, XLabs) <-> diffusers' split modules.

Canonical keys are diffusers' `FluxTransformer2DModel` module paths under the `transformer` component (state.py).
Black Forest Labs' original model, which kohya sd-scripts, ComfyUI and XLabs name their LoRA keys after, fuses
some of diffusers' Linear layers into one (checked against diffusers `convert_flux_to_diffusers.py` and
`_convert_kohya_flux_lora_to_diffusers`):

    double_blocks.i.img_attn.qkv     rows [q | k | v]           transformer_blocks.i.attn.to_q / to_k / to_v
    double_blocks.i.txt_attn.qkv     rows [q | k | v]           ... attn.add_q_proj / add_k_proj / add_v_proj
    double_blocks.i.img_attn.proj                               ... attn.to_out.0    (txt_attn.proj: to_add_out)
    double_blocks.i.img_mlp.0 / .2                              ... ff.net.0.proj / ff.net.2  (txt: ff_context)
    double_blocks.i.img_mod.lin                                 ... norm1.linear      (txt_mod.lin: norm1_context)
    single_blocks.i.linear1          rows [q | k | v | mlp]     single_transformer_blocks.i.attn.to_q / to_k /
                                                                to_v / proj_mlp   (q, k, v: d rows; mlp: 4d)
    single_blocks.i.linear2                                     ... proj_out
    single_blocks.i.modulation.lin                              ... norm.linear
    img_in, txt_in, time_in.*, vector_in.*, guidance_in.*, final_layer.linear: see `_TOP`
    final_layer.adaLN_modulation.1   rows [shift | scale]       norm_out.linear, rows [scale | shift]

Fused <-> split is exact, never a refit. A fused LoRA ΔW = s·B·A with A (R x in) and B (Σ d_j x R) is the
stack of the pieces' ΔW_j = s·B_j·A, B_j the rows of piece j: the pieces share A. When B is block diagonal (the
pieces were trained separately and concatenated, as kohya's `split_qkv` saves them), piece j takes only its
own columns: A_j = A[cols_j], B_j = B[rows_j, cols_j], which is the same product with smaller rank. The reverse
concatenates ranks: A = [A_1; ...; A_n], B = blockdiag(B_1, ..., B_n), or, when every piece has the same A
(a file that was fused to begin with), A once and B = [B_1; ...; B_n]. A missing piece is zero rows of B,
and zero rows read back as a missing piece (its ΔW is zero either way) unless every row is zero.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lorafuse.errors import LoraFormatError
from lorafuse.families.flux import BFL_DOUBLE, BFL_SINGLE, BFL_SWAPPED, BFL_TOP, MLP_RATIO
from lorafuse.lora.state import LoraModule

COMPONENT = "transformer"

_DOUBLE, _SINGLE, _TOP, _SWAPPED = BFL_DOUBLE, BFL_SINGLE, BFL_TOP, BFL_SWAPPED
_BLOCKS = {
    "double_blocks": ("transformer_blocks", _DOUBLE),
    "single_blocks": ("single_transformer_blocks", _SINGLE),
}
_BLOCK_RE = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_FLAT_BLOCK_RE = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")
_FLAT = {
    "double_blocks": {k.replace(".", "_"): k for k in _DOUBLE},
    "single_blocks": {k.replace(".", "_"): k for k in _SINGLE},
    "": {k.replace(".", "_"): k for k in _TOP},
}


@dataclass(frozen=True)
class FusedTarget:
    """One BFL Linear and the canonical keys of the diffusers Linears it stacks (row blocks, in order)."""

    bfl: str  # "double_blocks.0.img_attn.qkv"
    pieces: tuple[str, ...]  # ("transformer.transformer_blocks.0.attn.to_q", ...)

    @property
    def swapped(self) -> bool:
        return self.bfl in _SWAPPED

    def dims(self, out_features: int, in_features: int) -> list[int]:
        """Rows of each piece in the fused weight (out_features rows, in_features columns)."""
        n = len(self.pieces)
        if n == 1:
            return [out_features]
        if self.bfl.endswith("linear1"):
            return [in_features] * 3 + [
                out_features - 3 * in_features
            ]  # q, k, v are d x d; mlp takes the rest
        return [out_features // n] * n


def bfl_target(path: str) -> FusedTarget | None:
    """'double_blocks.0.img_attn.qkv' -> its FusedTarget; None if it is no FLUX.1 transformer Linear."""
    m = _BLOCK_RE.match(path)
    if m:
        kind, i, rest = m.groups()
        prefix, table = _BLOCKS[kind]
        subs = table.get(rest)
        if subs is None:
            return None
        return FusedTarget(path, tuple(f"{COMPONENT}.{prefix}.{i}.{s}" for s in subs))
    if path in _TOP:
        return FusedTarget(path, (f"{COMPONENT}.{_TOP[path]}",))
    return None


def bfl_from_flat(name: str) -> str | None:
    """Kohya's flattened BFL name ('double_blocks_0_img_attn_qkv') -> the dotted path, or None."""
    m = _FLAT_BLOCK_RE.match(name)
    if m:
        kind, i, rest = m.groups()
        sub = _FLAT[kind].get(rest)
        return None if sub is None else f"{kind}.{i}.{sub}"
    return _FLAT[""].get(name)


def _inverse() -> dict[str, tuple[str, str, int]]:
    """diffusers path pattern inside a block (or top-level path) -> (BFL block kind, BFL sub path, piece index)."""
    inverse: dict[str, tuple[str, str, int]] = {}
    for kind, (_, table) in _BLOCKS.items():
        for bfl, subs in table.items():
            for j, sub in enumerate(subs):
                inverse[f"{kind}:{sub}"] = (kind, bfl, j)
    for bfl, sub in _TOP.items():
        inverse[f":{sub}"] = ("", bfl, 0)
    return inverse


_INVERSE = _inverse()
_DIFFUSERS_BLOCK_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_KIND_OF = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}


def target_of(key: str) -> tuple[FusedTarget, int] | None:
    """Canonical key -> (the BFL Linear holding it, its piece index); None if the key has no BFL name."""
    component, _, path = key.partition(".")
    if component != COMPONENT:
        return None
    m = _DIFFUSERS_BLOCK_RE.match(path)
    if m:
        kind, i, rest = _KIND_OF[m.group(1)], m.group(2), m.group(3)
        hit = _INVERSE.get(f"{kind}:{rest}")
        if hit is None:
            return None
        target = bfl_target(f"{kind}.{i}.{hit[1]}")
        return (target, hit[2]) if target is not None else None
    hit = _INVERSE.get(f":{path}")
    if hit is None:
        return None
    target = bfl_target(hit[1])
    return (target, 0) if target is not None else None


def is_flux_key(key: str) -> bool:
    return key.startswith(COMPONENT + ".")


# --- exact split / fuse ----------------------------------------------------------------------------------


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _own_columns(up: torch.Tensor, dims: list[int]) -> list[torch.Tensor] | None:
    """Per row block, the columns of B it uses, when no column is used by two blocks (B block-structured);
    None when the blocks share columns (or B is all zeros: nothing tells the pieces apart)."""
    used = [block.ne(0).any(dim=0) for block in up.split(dims, dim=0)]
    if not any(u.any() for u in used):
        return None
    if (torch.stack(used).sum(dim=0) > 1).any():
        return None
    return [u.nonzero().flatten() for u in used]


def split_fused(module: LoraModule, target: FusedTarget, where: str) -> dict[str, LoraModule]:
    """A LoRA on the fused BFL Linear -> exact LoRAs on its diffusers pieces (see the module docstring)."""
    if module.delta is not None:  # dense ΔW (LoHa / LoKr): the pieces are its row blocks
        delta = _swap_halves(module.delta) if target.swapped else module.delta
        dims = target.dims(delta.shape[0], delta.flatten(1).shape[1])
        _check_dims(dims, delta.shape[0], where)
        return {k: LoraModule(delta=d) for k, d in zip(target.pieces, delta.split(dims), strict=True)}
    assert module.down is not None and module.up is not None
    if module.down.dim() != 2:
        raise LoraFormatError(
            f"{where}: FLUX.1 LoRAs are on Linear layers, got down {tuple(module.down.shape)}"
        )
    up = _swap_halves(module.up) if target.swapped else module.up
    if len(target.pieces) == 1:
        return {target.pieces[0]: LoraModule(down=module.down, up=up, alpha=module.alpha)}
    dims = target.dims(up.shape[0], module.down.shape[1])
    _check_dims(dims, up.shape[0], where)
    cols = _own_columns(up, dims)
    out: dict[str, LoraModule] = {}
    if cols is None:  # shared A: each piece is B's row block times the whole A, at the same scale
        blocks = up.split(dims)
        trained = [bool(b.ne(0).any()) for b in blocks]
        for key, block, keep in zip(target.pieces, blocks, trained, strict=True):
            if keep or not any(trained):  # a zero row block is a piece that was not trained (ΔW_j = 0)
                out[key] = LoraModule(down=module.down, up=block, alpha=module.alpha)
        return out
    scale = module.scale
    for key, block, idx in zip(target.pieces, up.split(dims), cols, strict=True):
        if len(idx) == 0:
            continue  # zero rows: this piece was not trained
        # same scale s = alpha / R on rank r_j: alpha_j = s · r_j (None keeps "alpha = rank", i.e. s = 1)
        alpha = None if module.alpha is None else scale * len(idx)
        out[key] = LoraModule(down=module.down[idx], up=block[:, idx], alpha=alpha)
    return out


def _check_dims(dims: list[int], rows: int, where: str) -> None:
    if min(dims) <= 0 or sum(dims) != rows:
        raise LoraFormatError(f"{where}: {rows} output rows do not split into the FLUX.1 pieces {dims}")


def fuse_pieces(
    pieces: Mapping[str, LoraModule], target: FusedTarget, dims: list[int], where: str
) -> LoraModule:
    """LoRAs on some of a BFL Linear's pieces -> one exact LoRA on the fused Linear (missing pieces: zero rows)."""
    present = [(j, pieces[k]) for j, k in enumerate(target.pieces) if k in pieces]
    if len(target.pieces) == 1:
        m = present[0][1]
        up = _swap_halves(m.up) if target.swapped else m.up
        return LoraModule(down=m.down, up=up, alpha=m.alpha)
    dtype = present[0][1].up.dtype
    for _, m in present[1:]:
        dtype = torch.promote_types(dtype, m.up.dtype)
    offsets = [sum(dims[:j]) for j in range(len(dims))]
    first = present[0][1]
    same_scale = all(math.isclose(m.scale, first.scale, rel_tol=1e-12) for _, m in present)
    shared = same_scale and all(
        m.down.shape == first.down.shape and torch.equal(m.down, first.down) for _, m in present
    )
    if shared:  # one A: B is the row stack, zero rows where a piece is missing
        up = first.up.new_zeros((sum(dims), first.rank), dtype=dtype)
        for j, m in present:
            up[offsets[j] : offsets[j] + dims[j]] = m.up
        return LoraModule(down=first.down.to(dtype), up=up, alpha=first.alpha)
    total = sum(m.rank for _, m in present)
    down = torch.cat([m.down.to(dtype) for _, m in present])
    up = first.up.new_zeros((sum(dims), total), dtype=dtype)
    col = 0
    for j, m in present:
        # equal scales stay in alpha (factors untouched); unequal ones are folded into B at scale 1
        block = m.up if same_scale else (m.up.float() * m.scale).to(dtype)
        up[offsets[j] : offsets[j] + dims[j], col : col + m.rank] = block
        col += m.rank
    if same_scale:
        alpha = None if all(m.alpha is None for _, m in present) else first.scale * total
    else:
        alpha = float(total)
    return LoraModule(down=down, up=up, alpha=alpha)


def piece_dims(pieces: Mapping[str, LoraModule], target: FusedTarget, where: str) -> list[int]:
    """Row counts of the fused Linear, from the pieces present (FLUX: q, k, v are d x d, mlp 4d x d)."""
    shapes = {k: (int(m.up.shape[0]), int(m.down.shape[1])) for k, m in pieces.items() if k in target.pieces}
    if not shapes:
        raise LoraFormatError(f"{where}: no pieces of {target.bfl}")
    in_features = next(iter(shapes.values()))[1]
    dims = []
    for j, key in enumerate(target.pieces):
        if key in shapes:
            dims.append(shapes[key][0])
        elif key.endswith("proj_mlp"):
            dims.append(MLP_RATIO * in_features)
        elif len(target.pieces) > 1 and j < 3:
            dims.append(in_features)  # attention q / k / v are square in FLUX.1
        else:
            raise LoraFormatError(f"{where}: cannot size the missing piece {key}")
    return dims


def from_bfl(modules: Mapping[str, LoraModule], source: str) -> dict[str, LoraModule]:
    """{BFL module path: LoRA} -> {canonical key: LoRA}, fused Linears split exactly."""
    out: dict[str, LoraModule] = {}
    for path, module in modules.items():
        target = bfl_target(path)
        if target is None:
            raise LoraFormatError(f"{source}: {path!r} is not a LoRA-able FLUX.1 transformer module")
        for key, piece in split_fused(module, target, f"{source}: {path}").items():
            if key in out:
                raise LoraFormatError(f"{source}: two entries for module {key} (second from {path})")
            out[key] = piece
    return out


def to_bfl(modules: Mapping[str, LoraModule], source: str) -> dict[str, LoraModule]:
    """{canonical transformer key: LoRA} -> {BFL module path: LoRA}, split pieces fused exactly."""
    groups: dict[str, tuple[FusedTarget, dict[str, LoraModule]]] = {}
    for key, module in modules.items():
        hit = target_of(key)
        if hit is None:
            raise LoraFormatError(
                f"{source}: {key} has no name in the BFL / kohya FLUX.1 layout; save this LoRA in the diffusers "
                "format instead"
            )
        if module.down is None:
            raise LoraFormatError(
                f"{source}: {key} is a dense ΔW (rebuilt from LyCORIS LoHa/LoKr); a fused FLUX.1 Linear stores only "
                "(down, up) pairs. Reduce it to a low-rank LoRA first (SVD), then save."
            )
        target = hit[0]
        groups.setdefault(target.bfl, (target, {}))[1][key] = module
    out: dict[str, LoraModule] = {}
    for bfl, (target, pieces) in groups.items():
        where = f"{source}: {bfl}"
        dims = piece_dims(pieces, target, where) if len(target.pieces) > 1 else []
        out[bfl] = fuse_pieces(pieces, target, dims, where)
    return out
