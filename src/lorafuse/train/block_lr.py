"""kohya's block-wise learning rates for LoRA (networks.lora's down_lr_weight / mid_lr_weight / up_lr_weight).

Each UNet module's LR is the component LR times the weight of its block: down_lr_weight per input block IN00..,
mid_lr_weight for MID, up_lr_weight per output block OUT00.. (kohya's numbering, as block_dims; 12 + 1 + 12 for
SD1.5, 9 + 1 + 9 for SDXL). A weight list may also be a kohya preset name: sine, cosine, linear,
reverse_linear or zeros, with an optional "+offset" ("cosine+0.5"). Blocks whose weight is <= block_lr_zero_threshold
get no LoRA at all, as in kohya. Modules outside the numbered blocks (and the text encoders) keep weight 1.
As kohya, a down / up list shorter than the blocks is filled with 1.0 and a longer one cut (with a warning); SDXL's
mid_lr_weight may be kohya's three values, one per middle_block.0 / .1 / .2 (keys MID0..MID2 here).
"""

from __future__ import annotations

import logging
import math

from lorafuse.errors import UserInputError

log = logging.getLogger(__name__)

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


def _weights(spec: str | float | tuple[float, ...] | None, n: int, key: str) -> list[float] | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        return preset_weights(spec, n)
    values = [float(v) for v in (spec if isinstance(spec, (tuple, list)) else [spec])]
    if len(values) != n:  # kohya's rule: fill with 1.0, or cut
        log.warning("network.%s has %d entries for %d blocks: %s as kohya does", key, len(values), n,
                    "filled with 1.0" if len(values) < n else "cut")  # fmt: skip
        values = (values + [1.0] * n)[:n]
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
    mid = net.mid_lr_weight
    if isinstance(mid, (tuple, list)) and len(mid) > 1 and len(outs) == 9:  # SDXL: kohya's three middle blocks
        out.update({f"MID{i}": w for i, w in enumerate(_weights(mid, 3, "mid_lr_weight"))})
        out["MID"] = max(out["MID0"], out["MID1"], out["MID2"])  # the block group's LR (its modules look up MIDi)
    elif mid is not None:
        out["MID"] = _weights(mid, 1, "mid_lr_weight")[0]
    return out


def module_lr_weight(weights: dict[str, float], block: str | None, mid_index: int | None) -> float:
    """The LR weight of a module in `block` ("MID" modules of SDXL: middle_block.`mid_index`)."""
    if block is None:
        return 1.0
    if block == "MID" and mid_index is not None and "MID0" in weights:
        return weights[f"MID{mid_index}"]
    return weights.get(block, 1.0)
