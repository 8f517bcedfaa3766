"""What a denoiser is conditioned on, as rows of tensors that guidance policies can stack and split.

The family (`lorafuse.families`) encodes prompts into these rows and maps them onto its denoiser's keyword
arguments; guidance policies only concatenate and chunk rows, so they work unchanged on every base.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser is conditioned on, for N rows of a batch.

    embeds:   (N, L, D) text-encoder hidden states (UNet `encoder_hidden_states`; FLUX: T5 states)
    pooled:   (N, P) pooled text embedding (SDXL `text_embeds`; FLUX `pooled_projections`, CLIP-L); else None
    time_ids: (N, 6) SDXL size and crop conditioning (`added_cond_kwargs["time_ids"]`); else None
    """

    embeds: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None

    def __post_init__(self) -> None:
        if self.time_ids is not None and self.pooled is None:
            raise ValueError("size conditioning (time_ids) needs the pooled text embedding too (SDXL)")
        rows = {len(x) for x in (self.embeds, self.pooled, self.time_ids) if x is not None}
        if len(rows) != 1:
            raise ValueError(f"conditioning tensors disagree on the number of rows: {sorted(rows)}")

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def rows(self, index: Tensor | slice) -> Conditioning:
        """The rows `index` of every tensor (a training batch, one half of a CFG batch)."""

        def pick(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[index]

        return Conditioning(self.embeds[index], pick(self.pooled), pick(self.time_ids))

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Rows of `parts` stacked in order: `cat([a, b])` has len(a) + len(b) rows."""

        def join(name: str) -> Tensor | None:
            tensors = [getattr(p, name) for p in parts]
            return None if tensors[0] is None else torch.cat(tensors)

        return Conditioning(join("embeds"), join("pooled"), join("time_ids"))


@dataclass(frozen=True)
class GuidanceCond:
    """The prompt (`cond`) and negative-prompt (`uncond`) conditioning of B images, B rows each."""

    cond: Conditioning
    uncond: Conditioning

    def __post_init__(self) -> None:
        if len(self.cond) != len(self.uncond):
            raise ValueError(f"cond has {len(self.cond)} rows but uncond has {len(self.uncond)}")

    def both(self) -> Conditioning:
        """(2B rows): uncond first, then cond, the order diffusers' pipelines use."""
        return Conditioning.cat([self.uncond, self.cond])
