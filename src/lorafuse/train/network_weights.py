"""kohya's network_weights / dim_from_weights: continue training from a LoRA file.

- network_weights alone: the network is planned as usual (network_dim, layers, ...); every module of the file
  must land on a module of that plan with the same rank, and its factors are copied in. When the file's alpha
  differs from the plan's, lora_up is rescaled so that ΔW = (alpha / r) B A is exactly the file's.
  Planned modules the file lacks keep their fresh initialisation (B = 0, so ΔW = 0 there), as kohya's
  non-strict load.
- with dim_from_weights: the plan is the file's modules with their own ranks and alphas (kohya's
  create_network_from_weights).

`check_network_weights` runs every one of these checks against the base's modules built on the meta device
(`models.meta`), so a file of the wrong family or with the wrong ranks fails `--dry-run` and fails a real run
before the base loads; `create_network` repeats them on the loaded base (the only check for bases whose
architecture shows only once loaded).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from lorafuse.errors import LoraFormatError, UserInputError
from lorafuse.families import Family, family_of, family_of_lora_keys, family_of_metadata, get_family
from lorafuse.lora.archs import ARCH_LABELS
from lorafuse.lora.io import check_lora_file, load_lora
from lorafuse.lora.state import LoraState
from lorafuse.lora.targets import components_of
from lorafuse.lora.validate import validate_lora
from lorafuse.train.network import is_3x3_conv, plan_network

log = logging.getLogger(__name__)

Where = dict[str, tuple[str, str]]  # file module key -> (component, module path) in the base


def check_network_weights(cfg) -> None:
    """Every network_weights check that needs no weights of the base, before any model loads (a TrainConfig)."""
    net = cfg.network
    if net.network_weights is None:
        return
    try:
        check_lora_file(net.network_weights)
    except UserInputError as e:
        raise type(e)(f"network.network_weights: {e}") from None
    from lorafuse.models.meta import meta_components

    try:
        comps = meta_components(str(cfg.model.pretrained_model_name_or_path))
        arch = family_of(comps).name
    except UserInputError:
        return  # a base known only once loaded (a hub name): create_network checks the file against it then
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real load, against the loaded base, warns
        state, where = read_weights(net.network_weights, comps, arch, net.network_module == "lycoris.kohya")
    if net.network_module == "networks.lora" and not net.dim_from_weights:
        check_plan(state, where, plan_network(comps, net, arch), comps, net)


def read_weights(path: Path, pipe: object, arch: str, lycoris: bool = False) -> tuple[LoraState, Where]:
    """The file as a `LoraState` and, per key, the (component, module path) it lands on in `pipe` (a pipeline or
    {component: module}, real or on the meta device). LoHa / LoKr modules only for a LyCORIS network."""
    state = load_lora(path, base=pipe)
    dense = [k for k, m in state.modules.items() if m.down is None]
    if dense and not lycoris:
        raise UserInputError(
            f"{path}: network_weights holds {len(dense)} LyCORIS LoHa/LoKr modules (e.g. {_name(state, dense[0])}); "
            "networks.lora continues only from LoRA / LoCon files"
        )
    try:
        report = validate_lora(state, pipe, arch=arch)
    except LoraFormatError as e:
        raise UserInputError(_other_family(state, path, arch, e.args[0].split(": ", 1)[-1])) from None
    missing = sorted(set(state.modules) - set(report.targets))
    if missing:
        detail = (
            f"{len(missing)} of {len(state.modules)} modules match nothing in this base (e.g. "
            f"{_name(state, missing[0])}); continue on the base the file was trained for"
        )
        raise UserInputError(_other_family(state, path, arch, detail, report.looks_like))
    return state, {k: (t.component, t.path) for k, t in report.targets.items()}


def _other_family(state: LoraState, path: Path, arch: str, detail: str, looks_like: str | None = None) -> str:
    """The message for a file that does not fit the base: by family first when the file names another family
    (module names only one family has, its metadata, or its shapes), else what validation found."""
    found: tuple[Family, str] | None = None
    by_keys = family_of_lora_keys(list(state.modules))
    by_meta = family_of_metadata(state.metadata)
    if by_keys is not None:
        found = by_keys, "its module names"
    elif by_meta is not None:
        key = (
            "modelspec.architecture"
            if state.metadata.get("modelspec.architecture")
            else "ss_base_model_version"
        )
        found = by_meta, f"metadata {key} = {state.metadata[key]!r}"
    elif looks_like is not None:
        found = get_family(looks_like), "its module shapes"
    label = ARCH_LABELS.get(arch, arch)
    if found is None or found[0].name == arch:
        return f"{path}: network_weights does not fit this {label} base: {detail}"
    family, why = found
    return (
        f"{path}: network_weights is a LoRA for {family.label} ({why}), but the base is {label}; continue on the "
        f"{family.label} base it was trained on, or from a LoRA made for {label}"
    )


def _name(state: LoraState, key: str) -> str:
    return state.source_names.get(key, key)


def plan_from_weights(state: LoraState, where: Where) -> dict:
    """dim_from_weights: component -> module path -> (rank, alpha) of the file."""
    plan: dict[str, dict[str, tuple[int, float]]] = {}
    for key, module in state.modules.items():
        comp, path = where[key]
        alpha = module.alpha if module.alpha is not None else float(module.rank)
        plan.setdefault(comp, {})[path] = (module.rank, float(alpha))
    return plan


def check_plan(state: LoraState, where: Where, plan: dict, base: object, net) -> None:
    """Without dim_from_weights every module of the file must be one the config trains, at the file's rank
    (kohya would stop in torch's load_state_dict with a size mismatch, after loading the model)."""
    comps = components_of(base)
    problems = []
    for key in sorted(state.modules):
        comp, path = where[key]
        rank = state.modules[key].rank
        planned = plan.get(comp, {}).get(path)
        if planned is None:
            problems.append(
                f"{_name(state, key)} is not among the modules this config trains ({_why_not(comp, path, comps, net)})"
            )
        elif planned[0] != rank:
            setting = _rank_setting(comps[comp].get_submodule(path), net)
            problems.append(f"module {_name(state, key)} has rank {rank} but {setting} is {planned[0]}")
    if problems:
        raise UserInputError(
            f"{net.network_weights}: {len(problems)} of {len(state.modules)} modules of network_weights do not fit "
            f"the network: {problems[0]}; set the network to the file's ranks and layers, or dim_from_weights = true"
        )


def _why_not(comp: str, path: str, comps: dict[str, nn.Module], net) -> str:
    if comp.startswith("text_encoder"):
        return "the file trains the text encoder, the config does not (network_train_unet_only)"
    if not net.train_unet:
        return "the file trains the denoiser, the config does not (network_train_text_encoder_only)"
    if is_3x3_conv(comps[comp].get_submodule(path)) and not net.conv_dim:
        return "a 3x3 conv (LoCon) and conv_dim is not set"
    blocks = " and block_dims" if net.block_dims is not None else ""
    return f"network.layers = {net.layers!r}{blocks} do not select it"


def _rank_setting(module: nn.Module, net) -> str:
    """The setting that gave a planned module its rank (network.py's rules), for the message."""
    if is_3x3_conv(module) and (net.conv_dim or net.conv_block_dims):
        return "conv_block_dims" if net.conv_block_dims is not None else "conv_dim"
    return "block_dims" if net.block_dims is not None else "network_dim"


def copy_weights(network, state: LoraState, where: Where, source: Path) -> None:
    """Copy each file module's (down, up) into the network's peft layer (A, B), keeping ΔW exact. `check_plan`
    (or dim_from_weights) has made sure every module is in the network at the file's rank."""
    layers = {(comp, path): layer for comp in network.plan for path, layer in network.layers(comp)}
    adapter = network.adapter
    with torch.no_grad():
        for key, place in where.items():
            module, layer = state.modules[key], layers[place]
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            ours = float(layer.lora_alpha[adapter]) / a.shape[0]
            a.copy_(module.down.reshape(a.shape))
            b.copy_((module.up * (module.scale / ours)).reshape(b.shape))
    log.info(
        "network_weights %s: %d modules loaded, %d start fresh", source, len(where), len(layers) - len(where)
    )


def load_lycoris_weights(network, path: Path, arch: str, base: object) -> None:
    """network_module = lycoris.kohya: the file's tensors into the LyCORIS network's modules of the same names, as
    kohya's non-strict load (modules the file lacks start fresh). Names, algorithm and shapes must agree: LyCORIS's
    state dict holds each module's alpha too, so the continued ΔW is exactly the file's."""
    from lorafuse.lora.io import read_tensors

    tensors, _ = read_tensors(path)
    ours = network.kohya_tensors(arch, base)  # the network's state dict under the names files carry
    params: dict[str, set[str]] = {}
    for key in ours:
        stem, _, part = key.partition(".")
        params.setdefault(stem, set()).add(part)
    problems = []
    stems = sorted({k.partition(".")[0] for k in tensors})
    for stem in stems:
        theirs = {k.partition(".")[2] for k in tensors if k.partition(".")[0] == stem}
        if stem not in params:
            problems.append(f"{stem} is not among the modules this network trains (lycoris_preset, conv_dim)")
        elif theirs != params[stem]:
            problems.append(
                f"{stem} holds {', '.join(sorted(theirs))}, the network ({network.net_cfg.algo}) "
                f"{', '.join(sorted(params[stem]))}: algo, network_dim / conv_dim or factor differ"
            )
        else:
            bad = [k for k in (f"{stem}.{p}" for p in sorted(theirs)) if tensors[k].shape != ours[k].shape]
            if bad:  # one line per module
                problems.append(
                    f"{bad[0]} has shape {tuple(tensors[bad[0]].shape)}, the network {tuple(ours[bad[0]].shape)}; "
                    "set network_dim / conv_dim / factor to the file's"
                )
    if problems:
        raise UserInputError(
            f"{path}: {len(problems)} of {len(stems)} modules of network_weights do not fit the LyCORIS network: "
            f"{problems[0]}"
        )
    lycoris_name = {kohya: lyco for lyco, kohya in network.kohya_names(arch, base).items()}
    renamed = {f"{lycoris_name[k.partition('.')[0]]}.{k.partition('.')[2]}": t for k, t in tensors.items()}
    # LyCORIS's own load: its hooks set what the state dict does not hold (e.g. LoCon's scalar back to 1)
    unexpected = network.net.load_state_dict(renamed, strict=False).unexpected_keys
    assert not unexpected, unexpected  # every name was checked against the network above
    log.info("network_weights %s: %d LyCORIS modules loaded", path, len(stems))


_LYCORIS_MODULES = {"locon": "LoConModule", "loha": "LohaModule", "lokr": "LokrModule"}


def lycoris_from_weights(kohya, pipe: object, text_encoders, net, arch: str):
    """dim_from_weights with lycoris.kohya: LyCORIS's own create_network_from_weights builds each module from the
    file (its ranks, alphas, LoKr factors, as kohya does), once the file's kohya names are turned into the module
    paths LyCORIS looks modules up by (SDXL files carry SGM UNet names)."""
    from lorafuse.lora.io import read_tensors

    path = net.network_weights
    state, where = read_weights(path, pipe, arch, lycoris=True)  # the family and every module's target
    tensors, _ = read_tensors(path)
    several = isinstance(text_encoders, list)
    prefix = {
        "unet": "lora_unet",
        "text_encoder": "lora_te1" if several else "lora_te",
        "text_encoder_2": "lora_te2",
    }
    stem = {state.source_names.get(k, k): f"{prefix[c]}_{p.replace('.', '_')}" for k, (c, p) in where.items()}
    renamed = {f"{stem[k.partition('.')[0]]}.{k.partition('.')[2]}": t for k, t in tensors.items()}
    unet = components_of(pipe)["unet"]
    lyco, _ = kohya.create_network_from_weights(1.0, None, None, text_encoders, unet, weights_sd=renamed)
    kinds = {type(m).__name__ for m in [*lyco.text_encoder_loras, *lyco.unet_loras]}
    if kinds != {_LYCORIS_MODULES[net.algo]}:
        # the saved file's metadata names one algorithm (network_args algo), as kohya's
        raise UserInputError(
            f"{path}: network_weights holds LyCORIS {', '.join(sorted(kinds))} modules, network_args algo = "
            f"{net.algo} ({_LYCORIS_MODULES[net.algo]}); set algo to the file's"
        )
    return lyco
