"""LyCORIS updates that are not a single (down, up) pair, rebuilt to a dense ΔW (already scaled).

Definitions (LyCORIS `functional/loha.py`, `functional/lokr.py`, `functional/general.py`; same in ComfyUI):
- LoCon with a Tucker core: `lora_down` (r, in, 1, 1), `lora_mid` (r, r, kh, kw), `lora_up` (out, r, 1, 1):
  ΔW[o, i, h, w] = s · Σ_ab up[o, a] mid[a, b, h, w] down[b, i],  s = alpha / r, r = down.shape[0].
- LoHa (Hadamard product of two low-rank matrices, FedPara):
  ΔW = s · (w1_a @ w1_b) ⊙ (w2_a @ w2_b),  w*_a (out, r), w*_b (r, in·kh·kw),  s = alpha / r, r = w1_b.shape[0].
  With Tucker cores t1, t2 (r, r, kh, kw) the factors are (r, out) and (r, in):
  W_k[o, i, h, w] = Σ_ab t_k[a, b, h, w] w_k_b[b, i] w_k_a[a, o].
- LoKr (Kronecker product): ΔW = s · kron(w1, w2), w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b,
  w2 = lokr_w2, or lokr_w2_a @ lokr_w2_b, or the Tucker form of (lokr_t2, lokr_w2_a (r, out2), lokr_w2_b (r, in2)).
  For conv, w1 (a, c) is broadcast as (a, c, 1, 1). s = alpha / r with r the rank of the factorised part
  (w1_b.shape[0] or w2_b.shape[0]); when both w1 and w2 are full matrices LyCORIS sets alpha = r, so s = 1.
A missing alpha means alpha = r (s = 1) everywhere, as in LyCORIS and kohya.

LoHa without Tucker stores conv updates flattened (out, in·kh·kw): the file does not record the kernel, so
that ΔW stays 2-D here and is reshaped to the base weight by `LoraModule.delta_weight(shape)`.
"""

from __future__ import annotations

import torch

from lorafuse.errors import LoraFormatError
from lorafuse.lora.formats.common import DAMAGED

LOHA_PARTS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"}
LOKR_PARTS = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}


def _scale(alpha: torch.Tensor | None, rank: int | None) -> float:
    if rank is None or alpha is None or float(alpha.item()) == 0:  # zero alpha means none, as in kohya
        return 1.0
    return float(alpha.item()) / rank


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """(r, r, kh, kw) core, wa (r, out), wb (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("abhw,ao,bi->oihw", t, wa, wb)


def _need(parts: dict[str, torch.Tensor], names: tuple[str, ...], where: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in parts]
    if missing:
        raise LoraFormatError(f"{where}: missing {', '.join(missing)}; {DAMAGED}")
    return [parts[n].float() for n in names]


def locon_tucker_delta(
    down: torch.Tensor, mid: torch.Tensor, up: torch.Tensor, alpha: float | None
) -> torch.Tensor:
    r = down.shape[0]
    s = (alpha if alpha is not None else r) / r
    return s * torch.einsum("oa,abhw,bi->oihw", up.float().flatten(1), mid.float(), down.float().flatten(1))


def loha_delta(parts: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    alpha = parts.get("alpha")
    if "hada_t1" in parts or "hada_t2" in parts:
        t1, w1a, w1b, t2, w2a, w2b = _need(
            parts, ("hada_t1", "hada_w1_a", "hada_w1_b", "hada_t2", "hada_w2_a", "hada_w2_b"), where
        )
        rank = w1b.shape[0]
        return _scale(alpha, rank) * _tucker(t1, w1a, w1b) * _tucker(t2, w2a, w2b)
    w1a, w1b, w2a, w2b = _need(parts, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), where)
    rank = w1b.shape[0]
    # (out, r) @ (r, in·kh·kw): conv factors may be stored 4-D, the product is defined on the flattened form
    m1 = w1a.flatten(1) @ w1b.flatten(1)
    m2 = w2a.flatten(1) @ w2b.flatten(1)
    return _scale(alpha, rank) * (m1 * m2)


def lokr_delta(parts: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    alpha = parts.get("alpha")
    rank = None
    if "lokr_w1" in parts:
        w1 = parts["lokr_w1"].float()
    else:
        w1a, w1b = _need(parts, ("lokr_w1_a", "lokr_w1_b"), where)
        rank = w1b.shape[0]
        w1 = w1a @ w1b
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"].float()
    elif "lokr_t2" in parts:
        t2, w2a, w2b = _need(parts, ("lokr_t2", "lokr_w2_a", "lokr_w2_b"), where)
        rank = w2b.shape[0]
        w2 = _tucker(t2, w2a, w2b)
    else:
        w2a, w2b = _need(parts, ("lokr_w2_a", "lokr_w2_b"), where)
        rank = w2b.shape[0]
        # conv without Tucker: (out2, r) @ (r, in2, kh, kw) -> (out2, in2, kh, kw)
        w2 = (w2a @ w2b.flatten(1)).reshape(w2a.shape[0], *w2b.shape[1:])
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    # kron needs contiguous inputs (einsum output may be a permuted view), as in LyCORIS make_kron
    return _scale(alpha, rank) * torch.kron(w1.contiguous(), w2.contiguous())
