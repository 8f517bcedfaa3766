"""kohya's `network_args` (["conv_dim=8", "algo=loha", ...]) converted to `NetworkConfig` fields, each argument
mapped, accepted at its off value, or refused by name with the reason.

The kohya_ss GUI spells out every argument of the chosen LoRA type, most at their off value
(`rank_dropout=0 bypass_mode=False dora_wd=False use_tucker=False ... train_norm=False` for LyCORIS), so off values
must pass quietly and only a setting that would change training is refused.
"""

from __future__ import annotations

import ast
from typing import Any

LYCORIS_ALGOS = ("locon", "loha", "lokr")

# Arguments lorafuse does not implement, grouped by why a value other than their off value (0, False, None) is
# refused; the GUI writes most of them at that value, which passes.
_REFUSED_BY_REASON: dict[str, tuple[str, ...]] = {
    "use network_dropout": ("dropout",),
    "rank dropout and module dropout are not implemented (network_dropout is)": (
        "rank_dropout", "module_dropout", "rank_dropout_scale",
    ),
    "Tucker decomposition of conv LyCORIS modules (use_tucker, or use_cp as older LyCORIS calls it) is not implemented": ("use_tucker", "use_cp"),
    "LyCORIS's trainable scalar is not implemented": ("use_scalar",),
    "training norm layers is not implemented": ("train_norm",),
    "LyCORIS bypass mode (for quantised bases) is not implemented": ("bypass_mode",),
    "DoRA is not implemented": ("dora_wd",),
    "LoKr with both factors decomposed is not implemented": ("decompose_both",),
    "an option of LyCORIS's Diag-OFT / BOFT, which are not supported": ("rescaled", "constrain"),
    "an option of LyCORIS's IA3, which is not supported": ("train_on_input",),
    "an option of LyCORIS's DyLoRA, which is not supported": ("block_size",),
    "an option of kohya's DyLoRA (networks.dylora), which is not supported": ("unit",),
    "T5-XXL LoRAs are not trained here (FLUX.1 trains the transformer and CLIP-L)": ("train_t5xxl",),
    "kohya lora_flux's split q/k/v LoRAs are not trained; the fused layout is written": ("split_qkv",),
}  # fmt: skip
_REFUSED = {arg: why for why, args in _REFUSED_BY_REASON.items() for arg in args}
_FLUX_BLOCK_ARGS = ("train_blocks", "train_double_block_indices", "train_single_block_indices")
_FLUX_KINDS = {"double": "transformer_blocks", "single": "single_transformer_blocks"}
_NUMBER_LISTS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")


def split_args(value: Any) -> list[tuple[str, Any]]:
    """kohya's ["k=v", ...] (or one space-separated string) -> [(k, python value)] as kohya's literal_eval."""
    items = value.split() if isinstance(value, str) else list(value or [])
    out = []
    for item in items:
        k, sep, v = str(item).partition("=")
        if not sep:
            raise ValueError(f"{item!r} is not key=value")
        try:
            parsed = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            parsed = v.strip()
        out.append((k.strip(), parsed))
    return out


def _is_off(value: Any) -> bool:
    """0, False, None or an empty value, also as the strings the GUI writes ("False", "None")."""
    if isinstance(value, str):
        return value.strip().lower() in ("false", "none", "0", "")
    return value in (None, 0, False)


def flux_layers(args: dict) -> str | list[str]:
    """kohya lora_flux's block selection -> network.layers: train_blocks (all, double, single) names the kinds,
    train_double_block_indices / train_single_block_indices ("all", "none", or "0,2,5-8") the blocks of each."""
    kinds = {"all": ("double", "single"), "double": ("double",), "single": ("single",)}.get(
        str(args.get("train_blocks", "all")).strip().lower()
    )
    if kinds is None:
        raise ValueError(f"train_blocks must be all, double or single, got {args['train_blocks']!r}")

    def spec(kind: str) -> str:  # literal_eval made "0,2" a tuple and "3" an int
        v = args.get(f"train_{kind}_block_indices", "all")
        return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v).strip().lower()

    indices = {kind: spec(kind) for kind in kinds}
    if all(chosen == "all" for chosen in indices.values()):
        return "all" if len(kinds) == 2 else kinds[0]
    patterns = []
    for kind, chosen in indices.items():
        if chosen == "none":
            continue
        if chosen == "all":
            patterns.append(rf"^{_FLUX_KINDS[kind]}\.\d+\.")
            continue
        numbers: list[int] = []
        for part in chosen.split(","):
            lo, _, hi = part.strip().partition("-")
            numbers += range(int(lo), int(hi or lo) + 1)
        patterns.append(rf"^{_FLUX_KINDS[kind]}\.({'|'.join(map(str, sorted(set(numbers))))})\.")
    if not patterns:
        raise ValueError("train_double_block_indices and train_single_block_indices select no block")
    return patterns


def _numbers(v: Any, kind=float) -> list:
    return [kind(x) for x in (v if isinstance(v, (tuple, list)) else [v])]


def _one(imp, key: str, k: str, v: Any, block_mode: bool) -> None:
    """One network argument k=v (from the kohya key `key`) into `imp`."""
    sub = f"{key}.{k}"
    if k in ("conv_dim", "conv_alpha"):
        imp.put(f"network.{k}", _numbers(v, int if k == "conv_dim" else float)[0], sub, v)
    elif k in ("conv_block_dims", "conv_block_alphas") and not block_mode:
        imp.note(sub, v, "kohya uses it only with block_dims or down/mid/up_lr_weight, which are not set")
    elif k in _NUMBER_LISTS:
        imp.put(f"network.{k}", _numbers(v, int if k.endswith("dims") else float), sub, v)
    elif k == "algo":  # NetworkConfig checks that it goes with network_module = lycoris.kohya
        if v in LYCORIS_ALGOS:
            imp.put("network.algo", v, sub, v)
        else:
            imp.refuse(sub, v, f"LyCORIS algorithm not supported; use one of {', '.join(LYCORIS_ALGOS)}")
    elif k == "preset":  # a LyCORIS preset name or TOML file; NetworkConfig checks it goes with lycoris.kohya
        imp.put("network.lycoris_preset", str(v), sub, v)
    elif k == "factor":
        imp.put("network.factor", int(v), sub, v)
    elif k in ("down_lr_weight", "up_lr_weight"):  # a preset name ("cosine+0.5") or comma-separated numbers
        imp.put(f"network.{k}", v if isinstance(v, str) else _numbers(v), sub, v)
    elif k == "mid_lr_weight":  # one number, or SDXL's three (middle_block.0 / .1 / .2)
        values = _numbers(v)
        imp.put(f"network.{k}", values[0] if len(values) == 1 else values, sub, v)
    elif k.startswith("loraplus_") and k.endswith("lr_ratio"):  # kohya reads them from network_args too
        imp.put(f"optimizer.{k}", float(v), sub, v)
    elif k == "block_lr_zero_threshold":
        imp.put(f"network.{k}", float(v), sub, v)
    elif k in _REFUSED:
        if _is_off(v):
            imp.note(sub, v, "off / the default")
        else:
            imp.refuse(sub, v, _REFUSED[k])
    else:
        imp.refuse(
            sub,
            v,
            "unknown network argument (not one of networks.lora's or LyCORIS's as lorafuse knows them)",
        )


def network_args(imp, key: str, value: Any, flat) -> None:
    """The `network_args` key of a flat kohya config into `imp` (a KohyaImport)."""
    try:
        args = split_args(value)
    except ValueError as e:
        imp.refuse(key, value, str(e))
        return
    flux_blocks = {k: v for k, v in args if k in _FLUX_BLOCK_ARGS}
    if flux_blocks:
        sub = f"{key}.{'/'.join(flux_blocks)}"
        try:
            imp.put("network.layers", flux_layers(flux_blocks), sub, flux_blocks)
        except ValueError as e:
            imp.refuse(sub, flux_blocks, str(e))
    names = {k for k, _ in args}
    # kohya's networks.lora reads conv_block_dims only in its block mode (block_dims or a block LR weight set)
    block_mode = bool(names & {"block_dims", "down_lr_weight", "mid_lr_weight", "up_lr_weight"})
    for k, v in args:
        if k in _FLUX_BLOCK_ARGS:
            continue
        try:
            _one(imp, key, k, v, block_mode)
        except (TypeError, ValueError):
            imp.refuse(f"{key}.{k}", v, "not a value kohya accepts for this argument")
