"""Rank-constrained backbone (PaRa-style; CRAFT-LoRA §3.3.1, App. A; docs/algorithms.md §7.1).

Per tuned layer l with weight W_l (d_out x d_in; a conv weight is flattened to d_out x (d_in kh kw)):
    B_c,l, B_s,l ∈ R^{d_out x r_l}     learnable content / style bases
    Q_c,l = QR(B_c,l),  Q_s,l = QR(B_s,l),  Q_l = QR([Q_c,l | Q_s,l])     orthonormal, d_out x (up to 2 r_l)
    W'_l = W_l − Q_l Q_lᵀ W_l           the output space of W_l with span(Q_l) projected off

Notation map: `content` / `style` are B_c,l / B_s,l; `basis()` is Q_l; `rank` is r_l; `r_max`, `r_min` the
rank schedule's ends; layers are numbered l = 1 ... L in the order the UNet forward calls them.

Rank schedule (eq. 2 / 14): r_l = round(r_max − (l − 1)/(L − 1) · (r_max − r_min)), rounding half up, earlier
layers higher. The paper's r_max = 128, r_min = 4 are for SDXL (widest block 1280 channels); `reference_width`
scales both by (this UNet's widest block / 1280), at least 1 (0 turns scaling off). Each r_l is capped at
d_out / 4 so the merged basis of 2 r_l columns removes at most half of a layer's output space.

Tuned layers (App. A: "attention and standard convolutional layers"): the attention projections to_q, to_k, to_v,
to_out.0 of every self-attention (attn1) and cross-attention (attn2), the latter off with
`exclude_cross_attention` (PaRa found excluding it best); and every k x k conv (k > 1) inside the down / mid / up
blocks (resnet conv1 / conv2, down- and upsamplers). conv_in / conv_out stay: 4 latent channels have no rank to
spare. Users may give their own regexes.

How it is built: `torch.nn.utils.parametrize` puts an `OutputProjection` on each tuned module's `weight`, so the
module's own forward sees W' (no patched forwards) and `bake()` writes W' into plain modules for saving.
Zero bases give an empty Q (columns with a zero pivot are dropped), so W' = W exactly; bases start random, since
at zero their gradient is zero too. The QR is scale invariant: `init_std` only sets the effective step size.

Stop-gradient (our reading of "one image supervises B_c, the other B_s", docs/algorithms.md §7.1): inside
`trainable_bases(unet, "content")` the style bases are detached (and vice versa), while both still shape W'.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from lorafuse.errors import UserInputError

ROLES = ("content", "style", "both", "none")
ATTENTION = r"attentions\.\d+\.transformer_blocks\.\d+\.attn{n}\.(to_q|to_k|to_v|to_out\.0)$"
_BLOCK_ORDER = {"conv_in": 0, "time_embedding": 0, "down_blocks": 1, "mid_block": 2, "up_blocks": 3}
# relative pivot size below which a basis column counts as absent (zero or linearly dependent)
_PIVOT_TOL = 1e-6


@dataclass(frozen=True)
class ParaOptions:
    r_max: int = 128
    r_min: int = 4
    reference_width: int = 1280
    exclude_cross_attention: bool = False
    layers: tuple[str, ...] | None = (
        None  # regexes (re.search on UNet module paths) instead of the default set
    )
    init_std: float | None = None  # None: 1 / sqrt(d_out), unit-norm columns on average

    def __post_init__(self) -> None:
        if not (
            isinstance(self.r_max, int) and isinstance(self.r_min, int) and 0 <= self.r_min <= self.r_max
        ):
            raise UserInputError(
                f"rank schedule needs integers 0 <= r_min <= r_max, got {self.r_min}, {self.r_max}"
            )
        if self.reference_width < 0:
            raise UserInputError(f"reference_width must be >= 0 (0: no scaling), got {self.reference_width}")


def orthonormal(b: torch.Tensor) -> torch.Tensor:
    """Thin QR of b (d x k) -> Q (d x k) with the columns of absent pivots zeroed (zero b -> zero Q)."""
    q, r = torch.linalg.qr(b, mode="reduced")
    pivots = torch.diagonal(r).abs()
    scale = pivots.max().clamp_min(torch.finfo(b.dtype).tiny) if pivots.numel() else 1.0
    keep = (pivots > _PIVOT_TOL * scale) & (pivots > 0)
    return q * keep.to(q.dtype)


class OutputProjection(nn.Module):
    """Parametrization W ↦ W − Q Qᵀ W with Q = QR([QR(B_c) | QR(B_s)]); see the module docstring."""

    def __init__(
        self, d_out: int, rank: int, init_std: float | None = None, generator: torch.Generator | None = None
    ):
        super().__init__()
        std = init_std if init_std is not None else 1.0 / math.sqrt(d_out)
        self.content = nn.Parameter(torch.randn(d_out, rank, generator=generator) * std)
        self.style = nn.Parameter(torch.randn(d_out, rank, generator=generator) * std)
        self.role = "both"  # which bases get gradients; see `trainable_bases`

    @property
    def rank(self) -> int:
        return self.content.shape[1]

    def basis(self) -> torch.Tensor:
        """Q_l (d_out x 2 r_l), float32; zero columns where a basis is absent."""
        b_c, b_s = self.content.float(), self.style.float()
        if self.role in ("style", "none"):
            b_c = b_c.detach()
        if self.role in ("content", "none"):
            b_s = b_s.detach()
        return orthonormal(torch.cat([orthonormal(b_c), orthonormal(b_s)], dim=1))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.reshape(
            weight.shape[0], -1
        ).float()  # (d_out, d_in·kh·kw); QR in float32 even for fp16 W
        q = self.basis()
        return (flat - q @ (q.T @ flat)).reshape(weight.shape).to(weight.dtype)


def _position_key(unet: nn.Module) -> dict[str, tuple[int, int]]:
    # diffusers registers up_blocks before mid_block, so named_modules() alone is not the forward order
    return {
        name: (_BLOCK_ORDER.get(name.split(".", 1)[0], 4), i)
        for i, (name, _) in enumerate(unet.named_modules())
    }


def tuned_layers(unet: nn.Module, options: ParaOptions = ParaOptions()) -> list[str]:
    """UNet module paths to constrain, in forward order (l = 1 ... L)."""
    modules = dict(unet.named_modules())
    if options.layers is not None:
        patterns = [re.compile(p) for p in options.layers]
        chosen = [
            n for n, m in modules.items()
            if isinstance(m, nn.Linear | nn.Conv2d) and any(p.search(n) for p in patterns)
        ]  # fmt: skip
    else:
        attention = [re.compile(ATTENTION.format(n=1))]
        if not options.exclude_cross_attention:
            attention.append(re.compile(ATTENTION.format(n=2)))
        chosen = []
        for name, module in modules.items():
            in_blocks = name.startswith(("down_blocks.", "mid_block.", "up_blocks."))
            if isinstance(module, nn.Linear) and any(p.search(name) for p in attention):
                chosen.append(name)
            elif in_blocks and isinstance(module, nn.Conv2d) and max(module.kernel_size) > 1:
                chosen.append(name)
    if not chosen:
        raise UserInputError("the backbone's layer selection matches no Linear / Conv2d module of this UNet")
    order = _position_key(unet)
    return sorted(chosen, key=lambda n: order[n])


def rank_schedule(num_layers: int, r_max: int, r_min: int) -> list[int]:
    """r_l = round(r_max − (l − 1)/(L − 1) (r_max − r_min)) for l = 1 ... L, rounding half up."""
    if num_layers < 1:
        return []
    if num_layers == 1:
        return [r_max]
    return [
        math.floor(r_max - (index - 1) / (num_layers - 1) * (r_max - r_min) + 0.5)
        for index in range(1, num_layers + 1)
    ]


def scaled_ranks(unet: nn.Module, options: ParaOptions) -> tuple[int, int]:
    """(r_max, r_min) scaled to this UNet's widest block (see the module docstring)."""
    if options.reference_width == 0:
        return options.r_max, options.r_min
    width = max(unet.config.block_out_channels)
    factor = width / options.reference_width
    return max(1, round(options.r_max * factor)), max(1, round(options.r_min * factor))


def layer_ranks(unet: nn.Module, options: ParaOptions = ParaOptions()) -> dict[str, int]:
    """{module path: r_l} in forward order, scaled and capped at d_out / 4."""
    paths = tuned_layers(unet, options)
    r_max, r_min = scaled_ranks(unet, options)
    modules = dict(unet.named_modules())
    return {
        path: min(r, modules[path].weight.shape[0] // 4)
        for path, r in zip(paths, rank_schedule(len(paths), r_max, r_min), strict=True)
    }


def _projections(unet: nn.Module) -> dict[str, OutputProjection]:
    out = {}
    for name, module in unet.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, OutputProjection):
                    out[name] = p
    return out


def apply_para(unet: nn.Module, options: ParaOptions = ParaOptions(), seed: int = 0) -> dict[str, int]:
    """Put an `OutputProjection` on every tuned layer (rank > 0); freeze everything else. Returns {path: r_l}."""
    if _projections(unet):
        raise UserInputError("this UNet already has rank-constrained layers; bake() or remove them first")
    ranks = layer_ranks(unet, options)
    generator = torch.Generator().manual_seed(seed)
    unet.requires_grad_(False)
    for path, rank in ranks.items():
        if rank == 0:
            continue
        module = unet.get_submodule(path)
        proj = OutputProjection(module.weight.shape[0], rank, options.init_std, generator)
        parametrize.register_parametrization(module, "weight", proj.to(module.weight.device))
    return ranks


def bases(unet: nn.Module) -> dict[str, nn.Parameter]:
    """{"<path>.content": B_c,l, "<path>.style": B_s,l}: the trainable parameters, for optimisers and files."""
    out = {}
    for path, proj in _projections(unet).items():
        out[f"{path}.content"], out[f"{path}.style"] = proj.content, proj.style
    return out


def load_bases(unet: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    params = bases(unet)
    if set(params) != set(tensors):
        missing = sorted(set(params) - set(tensors))
        extra = sorted(set(tensors) - set(params))
        raise UserInputError(
            f"{source}: the saved bases do not fit this backbone ({len(missing)} missing, e.g. "
            f"{missing[:1]}; {len(extra)} unexpected, e.g. {extra[:1]}); were ranks or layers changed?"
        )
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != tensors[name].shape:
                raise UserInputError(
                    f"{source}: basis {name} has shape {tuple(tensors[name].shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(tensors[name])


@contextlib.contextmanager
def trainable_bases(unet: nn.Module, role: str) -> Iterator[None]:
    """Inside: only the `role` bases ("content", "style", "both", "none") receive gradients."""
    if role not in ROLES:
        raise UserInputError(f"unknown basis role {role!r}; choose from {', '.join(ROLES)}")
    projections = list(_projections(unet).values())
    previous = [p.role for p in projections]
    for p in projections:
        p.role = role
    try:
        yield
    finally:
        for p, r in zip(projections, previous, strict=True):
            p.role = r


def bake(unet: nn.Module) -> int:
    """Replace every parametrized weight by its W' (plain tensors again); returns the number of layers."""
    names = list(_projections(unet))
    with torch.no_grad():
        for name in names:
            parametrize.remove_parametrizations(unet.get_submodule(name), "weight", leave_parametrized=True)
    return len(names)


def projected(unet: nn.Module, paths: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """{path: Q_l} of the constrained layers (for checks and diagnostics), computed without gradients."""
    with torch.no_grad():
        return {p: proj.basis() for p, proj in _projections(unet).items() if paths is None or p in paths}
