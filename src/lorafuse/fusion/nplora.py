"""NP-LoRA (arXiv 2511.11051; docs/algorithms.md §6): training-free fusion that keeps content out of style's inputs.

Per layer l covered by both LoRAs, the content update is (softly) projected off the input directions the style
LoRA reads, so content no longer writes over style where style listens:

    V_k = Q of the thin QR of A_sᵀ                      (in x k, k = r_s: an orthonormal basis of row(A_s))
    P   = I − μ/(1+μ) · V_k V_kᵀ                        (μ = 0 is no projection, μ → ∞ the full projection)
    ΔW  = w_s ΔW_s + w_c ΔW_c P

Notation map: `content` ΔW_c = s_c B_c A_c, `style` ΔW_s = s_s B_s A_s (docs/algorithms.md §0), `mu` μ,
`content_weight` w_c, `style_weight` w_s, `basis` V_k, `shrink` μ/(1+μ).

Low rank, exactly: ΔW_c P = s_c B_c (A_c P), so the result is a rank r_c + r_s LoRA with B = [w_c s_c B_c | w_s
s_s B_s], A = [A_c P ; A_s] (`merge_loras`, exact). It is fused into the weights: sampling costs what the base
model costs, and `nplora_lora` can be saved as an ordinary LoRA file.

Layers covered by only one LoRA keep that LoRA's update unchanged (there is nothing to project against).
Conv LoRAs (LoCon): A is (r, in, kh, kw); the projection acts on the flattened input dimension in·kh·kw (A as
an (r, in·kh·kw) matrix, the same matrix ΔW is as (out, in·kh·kw)); the paper states only the linear case.
If A_s is rank deficient, V_k still has r_s orthonormal columns and spans a little more than row(A_s).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import torch

from lorafuse.errors import UserInputError
from lorafuse.fusion.common import fuse_sum
from lorafuse.fusion.registry import (
    FusionConfig,
    FusionMethod,
    FusionPlan,
    check_range,
    register,
)
from lorafuse.lora.merge import merge_loras
from lorafuse.lora.resize import factorize
from lorafuse.lora.state import LoraModule, LoraState

NAME = "nplora"
MU_MAX = 1e4  # μ/(1+μ) is already 0.9999 there; larger values only hide typos


@dataclass
class NPLoraConfig(FusionConfig):
    """mu: projection strength μ ≥ 0 (0 = direct merge; μ/(1+μ) of the content update in the style's input
    subspace is removed)."""

    mu: float = 0.5

    def validate(self, method: str) -> None:
        super().validate(method)
        check_range(method, "mu", self.mu, 0.0, MU_MAX)


def _low_rank(module: LoraModule) -> LoraModule:
    return factorize(module.delta) if module.down is None else module


def style_basis(style: LoraModule) -> torch.Tensor:
    """V_k (in·kh·kw, k), float64: orthonormal basis of the row space of A_s."""
    a_s = _low_rank(style).down.double().flatten(1)  # (r_s, in[·kh·kw])
    q, _ = torch.linalg.qr(a_s.T, mode="reduced")  # (in, min(in, r_s))
    return q


def project_content(content: LoraModule, style: LoraModule, mu: float, key: str = "") -> LoraModule:
    """The content module with A_c replaced by A_c (I − μ/(1+μ) V_k V_kᵀ); B_c and alpha unchanged."""
    content = _low_rank(content)
    shrink = mu / (1.0 + mu)
    if shrink == 0.0:
        return content  # exactly the direct merge, not A_c − 0 rounded through float64
    a_c = content.down.double().flatten(1)  # (r_c, in[·kh·kw])
    basis = style_basis(style)
    if basis.shape[0] != a_c.shape[1]:
        raise UserInputError(
            f"{NAME}: {key}: content and style LoRAs disagree on the input size of this module "
            f"({a_c.shape[1]} vs {basis.shape[0]}); they were made for different base models"
        )
    # (A_c V) Vᵀ costs O(r_c·in·k); the dense P would be in x in
    projected = a_c - shrink * (a_c @ basis) @ basis.T
    down = projected.reshape(content.down.shape).to(content.down.dtype)
    return LoraModule(down=down, up=content.up, alpha=content.alpha)


def nplora_parts(content: LoraState, style: LoraState, mu: float) -> list[tuple[LoraState, float]]:
    """[(content with every shared module's A_c projected, 1), (style, 1)]: weight them by (w_c, w_s) and sum
    (`merge_loras` exactly, or `fuse_sum`) to get the NP-LoRA update."""
    projected = {
        key: project_content(module, style.modules[key], mu, key) if key in style.modules else module
        for key, module in content.modules.items()
    }
    return [(dataclasses.replace(content, modules=projected), 1.0), (style, 1.0)]


def nplora_lora(content: LoraState, style: LoraState, config: NPLoraConfig) -> LoraState:
    """The NP-LoRA update as one rank r_c + r_s LoRA file (the fused weights are this LoRA's ΔW)."""
    (content_p, _), _ = nplora_parts(content, style, config.mu)
    merged = merge_loras([content_p, style], [config.content_weight, config.style_weight])
    merged.metadata["lorafuse.fusion"] = json.dumps({"method": NAME, "mu": config.mu})
    return merged


@register
class NPLora(FusionMethod):
    name = NAME
    config_cls = NPLoraConfig
    paper_inputs = ("attn", {})  # as ZipLoRA, whose inputs the paper reuses: attention-projection LoRAs
    summary = (
        "NP-LoRA: content update projected off the style LoRA's input subspace (strength mu), "
        "training-free, fused into the weights"
    )

    def _build(self, plan: FusionPlan, pipe: Any, content: LoraState, style: LoraState, config: NPLoraConfig
               ) -> None:  # fmt: skip
        shared = sorted(set(content.modules) & set(style.modules))
        plan.record.update(
            shrink=config.mu / (1.0 + config.mu),
            projected_modules=len(shared),
            content_only_modules=len(content.modules) - len(shared),
            style_only_modules=len(style.modules) - len(shared),
        )
        (content_p, _), (style_p, _) = nplora_parts(content, style, config.mu)
        parts = [(content_p, config.content_weight), (style_p, config.style_weight)]
        plan.record.update(fuse_sum(pipe, parts, plan.undo))
