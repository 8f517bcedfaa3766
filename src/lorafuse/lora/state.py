"""The in-memory LoRA: one canonical form that every file format reads into and writes from.

Notation (algorithms.md §0): a LoRA'd layer has base weight W (out x in) and update
ΔW = scale · B A with B = `up` (out x r), A = `down` (r x in), scale = alpha / r.
Conv LoRAs (LoCon): A is (r, in, kh, kw), B is (out, r, 1, 1); ΔW is (out, in, kh, kw).

Module keys are canonical diffusers module paths with a component prefix:
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"      (SD1.5 / world; `text_model.` level always
    "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"    kept in the canonical key, see formats)
Formats that cannot be expressed as (down, up) (LyCORIS LoHa / LoKr) carry a dense `delta` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class LoraModule:
    """One module's update. Either (down, up, alpha) or a dense `delta` (LoHa/LoKr rebuilt)."""

    down: torch.Tensor | None = None  # A: (r, in) or (r, in, kh, kw)
    up: torch.Tensor | None = None  # B: (out, r) or (out, r, 1, 1)
    alpha: float | None = None  # None means alpha = rank (scale 1)
    delta: torch.Tensor | None = None  # dense ΔW, already scaled, for formats without a low-rank factorisation

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

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale · B A, shaped like the base weight. The one place this product is computed."""
        if self.delta is not None:
            return self.delta
        assert self.down is not None and self.up is not None
        down, up = self.down.float(), self.up.float()
        if down.dim() == 2:
            return self.scale * (up @ down)
        # conv: (out, r, 1, 1) x (r, in, kh, kw) -> (out, in, kh, kw)
        return self.scale * torch.einsum("or,rikl->oikl", up.flatten(1), down)


@dataclass
class LoraState:
    """A whole LoRA file in canonical form."""

    modules: dict[str, LoraModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "unknown"  # kohya | diffusers_attnproc | diffusers_peft | lycoris_locon | ...
    source_path: str | None = None

    def components(self) -> set[str]:
        return {key.split(".", 1)[0] for key in self.modules}

    def ranks(self) -> dict[str, int]:
        return {key: m.rank for key, m in self.modules.items()}
