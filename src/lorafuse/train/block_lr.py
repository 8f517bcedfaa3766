"""kohya's block-wise learning rates for LoRA (networks.lora's down_lr_weight / mid_lr_weight / up_lr_weight).

Each UNet module's LR is the component LR times the weight of its block: down_lr_weight per input block IN00..,
mid_lr_weight for MID, up_lr_weight per output block OUT00.. (kohya's numbering, as block_dims; 12 + 1 + 12 for
SD1.5, 9 + 1 + 9 for SDXL). A weight list may also be a kohya preset name: sine, cosine, linear,
reverse_linear or zeros, with an optional "+offset" ("cosine+0.5"). Blocks whose weight is <= block_lr_zero_threshold
get no LoRA at all, as in kohya. Modules outside the numbered blocks (and the text encoders) keep weight 1.
"""

from __future__ import annotations

import math

from lorafuse.errors import UserInputError

PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")


def preset_weights(spec: str, n: int) -> list[float]:
    """kohya's named weight curves over n blocks, e.g. "cosine+0.2"."""
    name, _, offset = spec.partition("+")
    base = float(offset) if offset else 0.0
    span = max(n - 1, 1)
    if name == "cosine":
        return [math.sin(math.pi * (i / span) / 2) + base for i in reversed(range(n))]
    if name == "sine":
        return [math.sin(math.pi * (i / span) / 2) + base for i in range(n)]
    if name == "linear":
        return [i / span + base for i in range(n)]
    if name == "reverse_linear":
        return [i / span + base for i in reversed(range(n))]
    if name == "zeros":
        return [base] * n
    raise UserInputError(
        f"unknown block LR preset {spec!r}; use one of {', '.join(PRESETS)} (optionally '+offset')"
    )


def _weights(spec: str | tuple[float, ...] | None, n: int, key: str) -> list[float] | None:
    if spec is None:
        return None
    values = preset_weights(spec, n) if isinstance(spec, str) else [float(v) for v in spec]
    if len(values) != n:
        raise UserInputError(f"network.{key} has {len(values)} entries, this UNet has {n} such blocks")
    return values


def block_lr_weights(net, labels: list[str]) -> dict[str, float] | None:
    """Block label ("IN04", "MID", "OUT11") -> LR weight, or None when no block weights are set."""
    if net.down_lr_weight is None and net.mid_lr_weight is None and net.up_lr_weight is None:
        return None
    ins = [label for label in labels if label.startswith("IN")]
    outs = [label for label in labels if label.startswith("OUT")]
    out = dict.fromkeys(labels, 1.0)
    for names, spec, key in (
        (ins, net.down_lr_weight, "down_lr_weight"),
        (outs, net.up_lr_weight, "up_lr_weight"),
    ):
        values = _weights(spec, len(names), key)
        if values is not None:
            out.update(zip(names, values, strict=True))
    if net.mid_lr_weight is not None:
        out["MID"] = float(net.mid_lr_weight)
    return out
