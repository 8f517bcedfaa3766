"""kohya's network_weights / dim_from_weights: continue training from a LoRA file.

- network_weights alone: the network is planned as usual (network_dim, layers, ...); every module of the file
  must land on a module of that plan with the same rank, and its factors are copied in. When the file's alpha
  differs from the plan's, lora_up is rescaled so that ΔW = (alpha / r) B A is exactly the file's.
  Planned modules the file lacks keep their fresh initialisation (B = 0, so ΔW = 0 there), as kohya's
  non-strict load.
- with dim_from_weights: the plan is the file's modules with their own ranks and alphas (kohya's
  create_network_from_weights).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lorafuse.errors import UserInputError
from lorafuse.lora.io import load_lora
from lorafuse.lora.state import LoraState
from lorafuse.lora.validate import validate_lora

log = logging.getLogger(__name__)


def read_weights(path: Path, pipe: object, arch: str) -> tuple[LoraState, dict[str, tuple[str, str]]]:
    """The file as a `LoraState` and, per key, the (component, module path) it lands on in `pipe`."""
    state = load_lora(path, base=pipe)
    dense = [k for k, m in state.modules.items() if m.down is None]
    if dense:
        raise UserInputError(
            f"{path}: network_weights holds {len(dense)} LyCORIS LoHa/LoKr modules (e.g. {dense[0]}); "
            "networks.lora continues only from LoRA / LoCon files"
        )
    report = validate_lora(state, pipe, arch=arch)
    missing = sorted(set(state.modules) - set(report.targets))
    if missing:
        raise UserInputError(
            f"{path}: {len(missing)} of {len(state.modules)} modules of network_weights match nothing in this "
            f"base (e.g. {missing[0]}); continue on the base the file was trained for"
        )
    return state, {k: (t.component, t.path) for k, t in report.targets.items()}


def plan_from_weights(state: LoraState, where: dict[str, tuple[str, str]]) -> dict:
    """dim_from_weights: component -> module path -> (rank, alpha) of the file."""
    plan: dict[str, dict[str, tuple[int, float]]] = {}
    for key, module in state.modules.items():
        comp, path = where[key]
        alpha = module.alpha if module.alpha is not None else float(module.rank)
        plan.setdefault(comp, {})[path] = (module.rank, float(alpha))
    return plan


def copy_weights(network, state: LoraState, where: dict[str, tuple[str, str]], source: Path) -> None:
    """Copy each file module's (down, up) into the network's peft layer (A, B), keeping ΔW exact."""
    by_place = {place: key for key, place in where.items()}
    layers = {(comp, path): layer for comp in network.plan for path, layer in network.layers(comp)}
    outside = [by_place[p] for p in by_place if p not in layers]
    if outside:
        raise UserInputError(
            f"{source}: {len(outside)} modules of network_weights are not in this network (e.g. {outside[0]}); "
            "use the layers / conv_dim the file was trained with, or set dim_from_weights = true"
        )
    adapter = network.adapter
    with torch.no_grad():
        for place, key in by_place.items():
            module, layer = state.modules[key], layers[place]
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            if a.shape[0] != module.rank:
                raise UserInputError(
                    f"{source}: {key} has rank {module.rank}, the network {a.shape[0]}; set network_dim / conv_dim "
                    "to the file's ranks, or dim_from_weights = true"
                )
            file_scale = module.scale
            ours = float(layer.lora_alpha[adapter]) / a.shape[0]
            a.copy_(module.down.reshape(a.shape))
            b.copy_((module.up * (file_scale / ours)).reshape(b.shape))
    left = len(layers) - len(by_place)
    log.info("network_weights %s: %d modules loaded, %d start fresh", source, len(by_place), left)
