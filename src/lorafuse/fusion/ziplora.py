"""ZipLoRA (Shah et al., ECCV 2024; docs/algorithms.md §5): learned column mergers between a content and a style LoRA.

Per LoRA'd UNet layer l, two merger vectors over the layer's input features, initialised to 1, scale the columns of
each update before they are summed:

    ΔW_m,l = w_c ΔW_c,l diag(m_c,l) + w_s ΔW_s,l diag(m_s,l)

They are learned so that the merged model reproduces each LoRA on that LoRA's own reference, while the two
mergers of a layer become orthogonal (the LoRAs then use disjoint input columns and stop interfering):

    L = ‖ε_m(x_c, p_c) − ε_c(x_c, p_c)‖² + ‖ε_m(x_s, p_s) − ε_s(x_s, p_s)‖² + λ Σ_l |cos(m_c,l, m_s,l)|

with ε_c, ε_s the UNet with only w_c ΔW_c, only w_s ΔW_s, and ε_m the merged UNet, all fed the same noisy latent
(same noise, same timestep) per reference. λ = 0.01, Adam lr 0.01 (the popular reimplementation's lr 5e-5 barely
moves the mergers, which is why it "equals direct merge"), at most 100 steps, stopping once the mean per-layer
|cos| is below `stop_similarity`.

Notation map: `content`/`style` are ΔW_c/ΔW_s (s · B A, docs/algorithms.md §0); `m_c`, `m_s` the mergers;
`content_ref` (x_c, p_c) and `style_ref` (x_s, p_s): VAE latents of a reference image (e.g. an image the LoRA
was trained on) and its prompt; `similarity_weight` λ; `lr` the Adam learning rate; w_c, w_s the user weights.

Our choices, stated:
- ‖·‖² is the mean squared error over latent elements (as in the public code), so λ's balance does not depend on
  the latent size.
- The user weights enter both the references and the merged model (ε_c uses w_c ΔW_c), so the mergers are
  learned for the mix the user asked for; all mergers at 1 is exactly the direct merge at (w_c, w_s).
- Conv LoRAs (LoCon): the merger acts on input channels (A is (r, in, kh, kw), m ∈ R^in).
- Text-encoder modules get no mergers (the paper merges UNet layers only): they are direct-merged, and each
  forward encodes its prompt with the text-encoder updates of the model it stands for.
- A layer covered by one LoRA only keeps its merger (learned by the MSE terms) and has no cosine term.

Result: mergers (`ZipMergers`, a few vectors per layer, saved as safetensors) or, equivalently, a rank r_c + r_s
LoRA B = [w_c s_c B_c | w_s s_s B_s], A = [A_c diag(m_c) ; A_s diag(m_s)] (`ziplora_lora`), never a dense ΔW.
The plan fuses that LoRA: sampling costs what the base model costs. Learning lives in `ziplora_train`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorafuse.errors import UserInputError
from lorafuse.fusion.common import fuse_sum
from lorafuse.fusion.registry import (
    FusionConfig,
    FusionMethod,
    FusionPlan,
    check_range,
    register,
)
from lorafuse.fusion.ziplora_train import (
    MERGERS_METADATA_KEY,
    NAME,
    ZipMergers,
    ZipReference,
    ZipTrainReport,
    encode_reference,
    train_ziplora,
    ziplora_loss,
)
from lorafuse.lora.merge import merge_loras
from lorafuse.lora.resize import factorize
from lorafuse.lora.state import LoraModule, LoraState

__all__ = [
    "ZipLora",
    "ZipLoraConfig",
    "ZipMergers",
    "ZipReference",
    "ZipTrainReport",
    "encode_reference",
    "train_ziplora",
    "ziplora_loss",
    "ziplora_lora",
    "ziplora_parts",
]


def _low_rank(module: LoraModule) -> LoraModule:
    return factorize(module.delta) if module.down is None else module


def _apply_mergers(state: LoraState, mergers: dict[str, Tensor], where: str) -> LoraState:
    """`state` with A of every merged module replaced by A diag(m) (columns of A scaled; input channels for
    conv). ΔW diag(m) = s B (A diag(m)), so the rank and B stay as they are."""
    unknown = sorted(set(mergers) - set(state.modules))
    if unknown:
        raise UserInputError(
            f"{NAME}: {where} has mergers for {len(unknown)} modules this LoRA does not have (e.g. {unknown[0]}); "
            "they were learned for other LoRAs"
        )
    modules = dict(state.modules)
    for key, m in mergers.items():
        module = _low_rank(modules[key])
        if m.shape != (module.down.shape[1],):
            raise UserInputError(
                f"{NAME}: {where}: merger for {key} has shape {tuple(m.shape)}, the LoRA needs ({module.down.shape[1]},)"
            )
        scale = m.to(torch.float32).view(1, -1, *([1] * (module.down.dim() - 2)))
        modules[key] = LoraModule(down=module.down.float() * scale, up=module.up, alpha=module.alpha)
    return dataclasses.replace(state, modules=modules)


def ziplora_parts(
    content: LoraState, style: LoraState, mergers: ZipMergers, where: str = "mergers"
) -> list[tuple[LoraState, float]]:
    """[(content with A_c diag(m_c), 1), (style with A_s diag(m_s), 1)]: weight and sum them for ΔW_m."""
    return [
        (_apply_mergers(content, mergers.m_c, where), 1.0),
        (_apply_mergers(style, mergers.m_s, where), 1.0),
    ]


def ziplora_lora(
    content: LoraState,
    style: LoraState,
    mergers: ZipMergers,
    content_weight: float = 1.0,
    style_weight: float = 1.0,
) -> LoraState:
    """The merged update as one rank r_c + r_s LoRA: B = [w_c s_c B_c | w_s s_s B_s], A = [A_c diag(m_c) ;
    A_s diag(m_s)], alpha = rank. Low-rank factors only; save it with `lorafuse.lora.io.save_lora`."""
    (c, _), (s, _) = ziplora_parts(content, style, mergers)
    merged = merge_loras([c, s], [content_weight, style_weight])
    merged.metadata.update({k: v for k, v in mergers.metadata.items() if k == MERGERS_METADATA_KEY})
    return merged


@dataclass
class ZipLoraConfig(FusionConfig):
    """Either references to learn mergers from (content_image + content_prompt, style_image + style_prompt; an
    image is a path, PIL image, (H, W, 3) array, or latents (1, C, h, w)), or `mergers` (a file from an earlier
    run, or `ZipMergers`). `save_mergers`: write the learned mergers there."""

    content_image: Any = None
    content_prompt: str | None = None
    style_image: Any = None
    style_prompt: str | None = None
    mergers: Any = None  # a path or ZipMergers
    max_steps: int = 100
    lr: float = 0.01
    similarity_weight: float = 0.01
    stop_similarity: float = 0.05
    seed: int = 0
    save_mergers: Path | None = None

    def validate(self, method: str) -> None:
        super().validate(method)
        check_range(method, "max_steps", self.max_steps, 1, 10_000, integer=True)
        check_range(method, "lr", self.lr, 1e-8, 1.0)
        check_range(method, "similarity_weight", self.similarity_weight, 0.0, 100.0)
        check_range(method, "stop_similarity", self.stop_similarity, 0.0, 1.0)
        check_range(method, "seed", self.seed, 0, 2**63 - 1, integer=True)
        if self.mergers is not None or (self.content_weight == 0 and self.style_weight == 0):
            return  # nothing to learn
        missing = [
            n
            for n in ("content_image", "content_prompt", "style_image", "style_prompt")
            if getattr(self, n) is None
        ]
        if missing:
            raise UserInputError(
                f"{method}: learning the mergers needs {', '.join(missing)} (a reference image each LoRA was "
                "trained on, and its prompt); or give mergers=<file from an earlier run>"
            )


@register
class ZipLora(FusionMethod):
    name = NAME
    config_cls = ZipLoraConfig
    paper_inputs = ("attn", {})  # the paper merges SDXL DreamBooth LoRAs on the attention projections
    needs_references = True
    summary = (
        "ZipLoRA: per-column mergers learned on a content and a style reference (<= 100 Adam steps), "
        "then fused as one rank r_c + r_s LoRA"
    )

    def _build(self, plan: FusionPlan, pipe: Any, content: LoraState, style: LoraState, config: ZipLoraConfig
               ) -> None:  # fmt: skip
        w_c, w_s = config.content_weight, config.style_weight
        if w_c == 0 and w_s == 0:
            plan.record["fused_modules"] = 0  # the update is zero whatever the mergers
            return
        if config.mergers is not None:
            mergers = (
                config.mergers if isinstance(config.mergers, ZipMergers) else ZipMergers.load(config.mergers)
            )
            where = str(config.mergers) if not isinstance(config.mergers, ZipMergers) else "mergers"
        else:
            refs = [
                encode_reference(pipe, config.content_image, config.content_prompt),
                encode_reference(pipe, config.style_image, config.style_prompt),
            ]
            mergers, report = train_ziplora(
                pipe, content, style, *refs, content_weight=w_c, style_weight=w_s, max_steps=config.max_steps,
                lr=config.lr, similarity_weight=config.similarity_weight,
                stop_similarity=config.stop_similarity, seed=config.seed,
            )  # fmt: skip
            where = "learned mergers"
            plan.record["training"] = {
                "steps": report.steps, "converged": report.converged, "seconds": round(report.seconds, 3),
                "final_loss": report.loss[-1], "final_similarity": report.similarity[-1],
            }  # fmt: skip
            if config.save_mergers is not None:
                plan.record["mergers_file"] = str(mergers.save(config.save_mergers))
        plan.record["merger_layers"] = len(set(mergers.m_c) | set(mergers.m_s))
        (c, _), (s, _) = ziplora_parts(content, style, mergers, where)
        plan.record.update(fuse_sum(pipe, [(c, w_c), (s, w_s)], plan.undo))
