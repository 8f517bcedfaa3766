"""The in-memory LoRA: one canonical form that every file format reads into and writes from.

Notation (docs/algorithms.md §0): a LoRA'd layer has base weight W (out x in) and update
ΔW = scale · B A with B = `up` (out x r), A = `down` (r x in), scale = alpha / r.
Conv LoRAs (LoCon): A is (r, in, kh, kw), B is (out, r, 1, 1); ΔW is (out, in, kh, kw).

Module keys are canonical diffusers module paths with a component prefix:
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"      (SD1.5 / world; `text_model.` level always
    "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"    kept in the canonical key, see formats)
    "transformer.transformer_blocks.0.attn.to_q"                    (FLUX.1: diffusers' split q / k / v; the
                                                                     fused BFL layout is a file format, flux_keys)
Formats that cannot be expressed as (down, up) (LyCORIS LoHa / LoKr) carry a dense `delta` instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


@dataclass
class LoraModule:
    """One module's update. Either (down, up, alpha) or a dense `delta` (LoHa/LoKr rebuilt)."""

    down: torch.Tensor | None = None  # A: (r, in) or (r, in, kh, kw)
    up: torch.Tensor | None = None  # B: (out, r) or (out, r, 1, 1)
    alpha: float | None = None  # None means alpha = rank (scale 1)
    # dense ΔW, already scaled, for formats without a low-rank factorisation
    delta: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        if self.down is not None:
            return int(self.down.shape[0])
        assert self.delta is not None
        return int(min(self.delta.shape[0], self.delta.flatten(1).shape[1]))

    @property
    def scale(self) -> float:
        if self.down is None:
            return 1.0
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def delta_weight(self, shape: Sequence[int] | None = None) -> torch.Tensor:
        """ΔW = scale · B A, shaped like the base weight. The one place this product is computed.

        `shape` (the base weight's) reshapes layouts that store the same numbers differently: a 2-D LoRA on
        a 1x1 conv, or a LoHa conv update that its file keeps flattened as (out, in·kh·kw).
        """
        if self.delta is not None:
            delta = self.delta
        else:
            assert self.down is not None and self.up is not None
            down, up = self.down.float(), self.up.float()
            if down.dim() == 2:
                delta = self.scale * (up.flatten(1) @ down)
            else:
                # conv: (out, r, 1, 1) x (r, in, kh, kw) -> (out, in, kh, kw)
                delta = self.scale * torch.einsum("or,rikl->oikl", up.flatten(1), down)
        if shape is not None and tuple(delta.shape) != tuple(shape):
            if delta.numel() != math.prod(shape) or delta.shape[0] != shape[0]:
                raise ValueError(
                    f"ΔW of shape {tuple(delta.shape)} does not fit a weight of shape {tuple(shape)}"
                )
            delta = delta.reshape(tuple(shape))
        return delta


@dataclass
class LoraState:
    """A whole LoRA file in canonical form."""

    modules: dict[str, LoraModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "unknown"  # kohya | diffusers_attnproc | diffusers_peft | lycoris_locon | ...
    source_path: str | None = None
    # canonical key -> module name as spelled in the file (kohya names): validation re-resolves these
    # against the actual base, and error messages quote what the user's file really contains
    source_names: dict[str, str] = field(default_factory=dict)

    def components(self) -> set[str]:
        return {key.split(".", 1)[0] for key in self.modules}

    def ranks(self) -> dict[str, int]:
        return {key: m.rank for key, m in self.modules.items()}
