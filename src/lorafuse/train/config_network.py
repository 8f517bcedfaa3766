"""The `[network]` table of a LoRA training config: what is trained (LoRA, LoCon or LyCORIS; rank, alpha, layers,
block-wise dims) and from which weights. Split from `train.config`, which re-exports it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lorafuse.config.checks import as_paths
from lorafuse.config.checks import bad as _bad
from lorafuse.config.checks import check_positive as _positive
from lorafuse.config.checks import check_rates as _rates
from lorafuse.train import config_limits as lim

_BLOCK_LISTS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")


@dataclass(frozen=True)
class NetworkConfig:
    # networks.lora (kohya's LoRA / LoCon) or lycoris.kohya (LyCORIS: algo = locon, loha, lokr)
    network_module: Literal["networks.lora", "lycoris.kohya"] = "networks.lora"
    # LyCORIS algorithm (network_module = lycoris.kohya only)
    algo: Literal["locon", "loha", "lokr"] = "locon"
    # LoKr's Kronecker factor (-1: as balanced as the shape allows)
    factor: int = -1
    # which modules LyCORIS trains (kohya's preset=): full, full-lin, attn-mlp, attn-only, unet-only,
    # unet-transformer-only, unet-convblock-only, or the path of a LyCORIS preset TOML file
    lycoris_preset: str = "full"
    # start from this LoRA file's weights (same layers and ranks, or set dim_from_weights)
    network_weights: Path | None = None
    # take ranks and alphas from network_weights instead of network_dim / network_alpha
    dim_from_weights: bool = False
    # LoRA rank r of Linear and 1x1 conv layers
    network_dim: int = 4
    # LoRA alpha: the update is scaled by alpha / r
    network_alpha: float = 1.0
    # dropout on the LoRA branch (peft's lora_dropout, on its input)
    network_dropout: float = 0.0
    conv_dim: int | None = None  # LoCon-style 3x3 conv layers; None = linear and 1x1 layers only
    # alpha of 3x3 conv layers (kohya's default 1 when conv_dim is set)
    conv_alpha: float | None = None
    # a preset: default (kohya's LoRA), attn, all (LoCon), blora_content, blora_style, craft_content, craft_style,
    # double, single (FLUX.1's block kinds) (lora/presets.py); or regexes, re.search-ed against the denoiser's
    # module paths (by index: '^transformer_blocks\\.(0|3)\\.')
    layers: str | tuple[str, ...] = "default"
    # rank per UNet block in kohya's order IN00.., MID, OUT00.. (25 for SD1.5, 19 SDXL (or kohya's 23: embedding,
    # IN00-08, middle_block 0-2, OUT00-08, out), 13 world); 0 = no LoRA
    block_dims: tuple[int, ...] | None = None
    # per-block alphas, same order and length as block_dims
    block_alphas: tuple[float, ...] | None = None
    # rank of the 3x3 convs per UNet block (kohya's conv_block_dims; instead of conv_dim), same order as block_dims
    conv_block_dims: tuple[int, ...] | None = None
    # alphas of the 3x3 convs per block (unset: conv_alpha, or 1 as kohya)
    conv_block_alphas: tuple[float, ...] | None = None
    # LR weight per input block IN00.. (a list), or a kohya preset: sine, cosine, linear, reverse_linear, zeros
    down_lr_weight: str | tuple[float, ...] | None = None
    # LR weight of the MID block (SDXL: also kohya's three, for middle_block.0 / .1 / .2)
    mid_lr_weight: float | tuple[float, ...] | None = None
    # LR weight per output block OUT00.. (a list), or a preset name as down_lr_weight
    up_lr_weight: str | tuple[float, ...] | None = None
    # blocks whose LR weight is <= this get no LoRA (kohya's block_lr_zero_threshold)
    block_lr_zero_threshold: float = 0.0
    # no text-encoder LoRA
    network_train_unet_only: bool = False
    # no UNet LoRA
    network_train_text_encoder_only: bool = False

    def __post_init__(self) -> None:
        as_paths(self, "network_weights")
        _positive(self, "network_dim", "network_alpha", "conv_dim", "conv_alpha")
        # not LoKr's: LyCORIS takes a dim past half a factor's side as "full matrix" (the kohya_ss GUI writes
        # conv_dim=100000 for it), so there the dim allocates nothing
        if not (self.network_module == "lycoris.kohya" and self.algo == "lokr"):
            lim.check_at_most(self, lim.MAX_RANK, "the widest layer of any base", "network_dim", "conv_dim",
                              "block_dims", "conv_block_dims", hint="; a rank beyond a layer's width adds nothing")
        if self.network_module == "lycoris.kohya" and (
            self.layers != "default" or any(getattr(self, k) is not None for k in _BLOCK_LISTS)
        ):
            raise _bad(
                "network_module",
                "lycoris.kohya chooses its modules by its preset (lycoris_preset); layers / block_dims / "
                "block_alphas / conv_block_dims / conv_block_alphas are for networks.lora",
            )
        if self.network_module == "networks.lora" and (self.algo != "locon" or self.factor != -1):
            raise _bad("algo", "and factor are LyCORIS settings: set network_module = 'lycoris.kohya'")
        if self.network_module == "networks.lora" and self.lycoris_preset != "full":
            raise _bad("lycoris_preset", "is a LyCORIS setting: set network_module = 'lycoris.kohya'")
        if self.dim_from_weights and self.network_weights is None:
            raise _bad("dim_from_weights", "needs network_weights (the file to take ranks and alphas from)")
        _rates(self, "network_dropout")
        if self.conv_alpha is not None and self.conv_dim is None:
            raise _bad("conv_alpha", "is set but conv_dim is not")
        # imported here: lora.presets loads torch, and the config (the web UI's training form) must load without it
        from lorafuse.lora.presets import FAMILY_PRESET_NAMES as PRESET_NAMES  # every family's presets

        if isinstance(self.layers, str) and self.layers not in PRESET_NAMES:
            raise _bad(
                "layers",
                f"unknown preset {self.layers!r}; use one of {', '.join(PRESET_NAMES)} or a list of regexes",
            )
        if not isinstance(self.layers, str):
            if not self.layers:
                raise _bad("layers", "is an empty list: no module would get a LoRA")
            for pattern in self.layers:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise _bad("layers", f"{pattern!r} is not a valid regular expression: {e}") from None
        for key in _BLOCK_LISTS:
            if any(v < 0 for v in getattr(self, key) or ()):
                raise _bad(
                    key, f"entries must be >= 0 (0 = no LoRA in that block), got {list(getattr(self, key))}"
                )
        for dims, alphas in (("block_dims", "block_alphas"), ("conv_block_dims", "conv_block_alphas")):
            d, a = getattr(self, dims), getattr(self, alphas)
            if d and a and len(d) != len(a):
                raise _bad(alphas, f"has {len(a)} entries, {dims} {len(d)}")
        if self.conv_block_alphas is not None and self.conv_block_dims is None:
            raise _bad("conv_block_alphas", "is set but conv_block_dims is not")
        if self.conv_block_dims is not None and not self.block_mode:
            raise _bad(
                "conv_block_dims",
                "needs block_dims or a block LR weight (down/mid/up_lr_weight), as in kohya, which ignores it "
                "otherwise; for one conv rank everywhere use conv_dim",
            )
        if self.network_train_unet_only and self.network_train_text_encoder_only:
            raise _bad(
                "network_train_unet_only", "and network_train_text_encoder_only are both true: nothing trains"
            )

    @property
    def block_mode(self) -> bool:
        """kohya's networks.lora works per block when block_dims or a block LR weight is set."""
        return any(
            getattr(self, k) is not None
            for k in ("block_dims", "down_lr_weight", "mid_lr_weight", "up_lr_weight")
        )

    @property
    def train_text_encoder(self) -> bool:
        return not self.network_train_unet_only

    @property
    def train_unet(self) -> bool:
        return not self.network_train_text_encoder_only
