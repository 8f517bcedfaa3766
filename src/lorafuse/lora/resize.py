"""SVD tools for LoRAs: truncate to a target rank (`resize_lora`), or factor a dense ΔW exactly (`factorize`).

Notation (docs/algorithms.md §0): ΔW = s · B A, flattened to a matrix M of shape (out, in·kh·kw) for convs (a LoCon
A is a (r, in, kh, kw) conv, B a 1x1 conv, so M = s · B_flat A_flat exactly). The truncated SVD
M ≈ U_k S_k V_kᵀ is the best rank-k approximation in Frobenius norm (Eckart-Young), and its error is known
without forming M: ‖M − M_k‖_F = sqrt(Σ_{i>k} σ_i²). New factors split the singular values evenly,
B = U_k S_k^½, A = S_k^½ V_kᵀ, with alpha = k (scale 1): balanced factors keep both in a range fp16 can hold,
where kohya's `resize_lora.py` puts all of S into `lora_up`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lorafuse.errors import UserInputError
from lorafuse.lora.state import LoraModule, LoraState


@dataclass(frozen=True)
class ModuleResize:
    rank_before: int
    rank_after: int
    norm: float  # ‖ΔW‖_F
    rel_error: float  # ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F (0 for a zero update)


@dataclass
class ResizeReport:
    rank: int
    conv_rank: int
    modules: dict[str, ModuleResize] = field(default_factory=dict)

    @property
    def total_rel_error(self) -> float:
        """‖ΔW − ΔW_k‖_F / ‖ΔW‖_F over all modules stacked (large modules weigh more than in a mean)."""
        total = sum(m.norm**2 for m in self.modules.values())
        lost = sum((m.rel_error * m.norm) ** 2 for m in self.modules.values())
        return math.sqrt(lost / total) if total > 0 else 0.0

    @property
    def max_rel_error(self) -> float:
        return max((m.rel_error for m in self.modules.values()), default=0.0)

    def worst(self, n: int = 5) -> list[tuple[str, ModuleResize]]:
        return sorted(self.modules.items(), key=lambda kv: kv[1].rel_error, reverse=True)[:n]

    def summary(self) -> str:
        ranks = sorted({m.rank_after for m in self.modules.values()})
        return (
            f"{len(self.modules)} modules resized to rank {', '.join(map(str, ranks))}; relative Frobenius error "
            f"total {self.total_rel_error:.4g}, worst module {self.max_rel_error:.4g}"
        )


def _kernel(module: LoraModule) -> tuple[int, ...]:
    """Trailing conv dims of ΔW as stored: () for a linear LoRA, (kh, kw) for a conv one."""
    if module.down is not None:
        return tuple(module.down.shape[2:])
    assert module.delta is not None
    return tuple(module.delta.shape[2:])


def _dense_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD through the Gram matrix of the short side, in float64.

    About 20x faster than a full SVD for an SDXL 3x3-conv ΔW (1280 x 11520: 1 s instead of 23 s on one core),
    which matters when a LoHa has a hundred of them. Squaring costs precision only below ~1e-8 σ_max in
    float64, far finer than float32 weights resolve.
    """
    m = m.double()
    wide = m.shape[0] <= m.shape[1]
    short = m if wide else m.T  # (k, n) with k <= n
    lam, u = torch.linalg.eigh(short @ short.T)  # ascending
    s = lam.flip(0).clamp_min(0).sqrt()
    u = u.flip(1)
    vh = (u.T @ short) / torch.where(s > 0, s, 1.0)[:, None]
    return (u, s, vh) if wide else (vh.T, s, u.T)


def low_rank_svd(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of ΔW flattened to (out, in·kh·kw), float64, singular values in decreasing order.

    A (down, up) module never forms ΔW: with thin QRs B = Q_b R_b and A_flatᵀ = Q_a R_a,
    ΔW = Q_b (s R_b R_aᵀ) Q_aᵀ, and only the small core needs an SVD. That is what makes resizing an SDXL
    LoRA with 3x3 LoCon modules (ΔW of 1280 x 11520) take seconds rather than minutes.
    """
    if module.down is None:
        assert module.delta is not None
        return _dense_svd(module.delta.flatten(1))
    assert module.up is not None
    up = module.up.double().flatten(1)  # (out, r)
    down = module.down.double().flatten(1)  # (r, in·kh·kw)
    q_b, r_b = torch.linalg.qr(up)
    q_a, r_a = torch.linalg.qr(down.T)
    u_c, s, vh_c = torch.linalg.svd(module.scale * (r_b @ r_a.T), full_matrices=False)
    return q_b @ u_c, s, vh_c @ q_a.T


def from_svd(
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    k: int,
    kernel: tuple[int, ...],
    dtype: torch.dtype,
) -> LoraModule:
    """The rank-k LoRA B = U_k S_k^½, A = S_k^½ V_kᵀ (alpha = k, scale 1), in the layout of `kernel`."""
    root = s[:k].sqrt()
    up = u[:, :k] * root  # (out, k)
    down = root[:, None] * vh[:k]  # (k, in·kh·kw)
    if kernel:
        down = down.reshape(k, -1, *kernel)  # (k, in, kh, kw)
        up = up[:, :, None, None]  # (out, k, 1, 1)
    return LoraModule(down=down.to(dtype).contiguous(), up=up.to(dtype).contiguous(), alpha=float(k))


def numerical_rank(s: torch.Tensor, shape: tuple[int, int], eps: float) -> int:
    """Singular values above numpy's matrix_rank tolerance σ_max · max(m, n) · eps (at least 1)."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 1
    tol = float(s[0]) * max(shape) * eps
    return max(1, int((s > tol).sum()))


def factorize(delta: torch.Tensor, *, dtype: torch.dtype | None = None) -> LoraModule:
    """A dense ΔW (LoHa / LoKr rebuilt) as an exact-rank LoRA: the SVD truncated at its numerical rank.

    Exact up to the rounding of `dtype` (the singular values dropped are below float32's resolution of ΔW),
    so the rank is that of ΔW: a LoHa of dims (r1, r2) gives at most r1·r2. Conv ΔW keep their conv layout.
    """
    dtype = dtype or (delta.dtype if delta.is_floating_point() else torch.float32)
    u, s, vh = low_rank_svd(LoraModule(delta=delta))
    k = numerical_rank(s, (delta.shape[0], delta[0].numel()), torch.finfo(torch.float32).eps)
    return from_svd(u, s, vh, k, tuple(delta.shape[2:]), dtype)


def resize_module(
    module: LoraModule, rank: int, *, dtype: torch.dtype | None = None
) -> tuple[LoraModule, ModuleResize]:
    """`module` truncated to rank min(rank, what it has), and how much of ΔW that loses."""
    if rank < 1:
        raise UserInputError(f"target rank must be at least 1, got {rank}")
    u, s, vh = low_rank_svd(module)
    k = max(1, min(rank, s.numel()))
    energy = s.square()
    total = float(energy.sum())
    lost = float(energy[k:].sum())
    rel = math.sqrt(lost / total) if total > 0 else 0.0
    source = module.down if module.down is not None else module.delta
    assert source is not None
    out = from_svd(u, s, vh, k, _kernel(module), dtype or source.dtype)
    return out, ModuleResize(module.rank, k, math.sqrt(total), rel)


def resize_lora(
    state: LoraState,
    rank: int,
    *,
    conv_rank: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[LoraState, ResizeReport]:
    """Every module truncated by SVD to `rank` (`conv_rank` for kernels larger than 1x1, default `rank`).

    Modules of lower rank come back re-factored at their own rank (lossless up to float rounding). Dense
    modules (LoHa / LoKr) are reduced too, which is how they become writable as plain kohya LoRA.
    dtype: of the new factors; default that of each module's tensors (fp16 files stay fp16).
    Returns the new state and a `ResizeReport` with the relative Frobenius error per module and in total.
    """
    conv_rank = rank if conv_rank is None else conv_rank
    for name, value in (("rank", rank), ("conv rank", conv_rank)):  # checked even when no module would use it
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"target {name} must be an int, at least 1, got {value!r}")
    report = ResizeReport(rank=rank, conv_rank=conv_rank)
    modules: dict[str, LoraModule] = {}
    for key in sorted(state.modules):
        module = state.modules[key]
        target = conv_rank if math.prod(_kernel(module)) > 1 else rank
        modules[key], report.modules[key] = resize_module(module, target, dtype=dtype)
    new = LoraState(
        modules=modules,
        metadata=dict(state.metadata),
        source_format=state.source_format,
        source_path=state.source_path,
        source_names=dict(state.source_names),
    )
    return new, report
