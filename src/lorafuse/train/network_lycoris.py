"""network_module = lycoris.kohya: LoCon / LoHa / LoKr trained with the `lycoris-lora` package, saved with its own
writer (kohya-style `lora_unet_*` / `lora_te*_` keys with lora_* / hada_* / lokr_* tensors), so the files load
wherever kohya's LyCORIS files load (A1111, ComfyUI) and in lorafuse's reader (lora/formats/lycoris.py).

Which modules: LyCORIS's own preset (kohya's `network_args = ["preset=..."]`, `network.lycoris_preset`): a built-in
name from lycoris.config.PRESET or a preset TOML file read by lycoris's PresetConfig, handed to
`LycorisNetworkKohya.apply_preset`, so LyCORIS selects the modules as it does under kohya. Two adjustments, both
about names that differ between kohya's UNet classes and diffusers', not about the selection rules:
- lycoris-lora 4.1.3's full / full-lin / unet-only list both the class TimestepEmbedding and the names
  time_embedding.linear_1/2, and stop with "duplicated lora name" on a diffusers UNet; names inside a module the
  class list already selects are dropped (the selected set is the same union);
- kohya's own UNets call their attention class CrossAttention, diffusers calls it Attention: attn-only lists the
  former and would select no UNet module here.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafuse.errors import UserInputError
from lorafuse.lora.targets import components_of
from lorafuse.train.config import NetworkConfig
from lorafuse.train.network_base import TrainableNetwork
from lorafuse.utils.extras import require

_CLASS_ALIASES = {"CrossAttention": "Attention"}  # kohya's UNet class name -> diffusers'
# apply_preset sets only the keys a preset has and leaves the others on the class as the last network set them
_BLANK_PRESET = {
    "enable_conv": True, "unet_target_module": [], "unet_target_name": [], "text_encoder_target_module": [],
    "text_encoder_target_name": [], "module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False,
    "exclude_name": [],
}  # fmt: skip
_OUR_ALGOS = (
    "lora",
    "locon",
    "loha",
    "lokr",
)  # what our reader rebuilds ("lora" is LyCORIS's name for LoCon)


def lycoris_preset(name: str) -> dict:
    """LyCORIS's preset `name` (built-in) or the preset TOML file at that path, as lycoris's own dict; refused
    with the reason where it asks for an algorithm lorafuse does not train."""
    config = require("lycoris.config", "network_module = lycoris.kohya")
    if name == "ia3":
        raise UserInputError(
            "network.lycoris_preset = 'ia3' is for LyCORIS's IA3 algorithm, which is not supported"
        )
    if name in config.PRESET:
        return copy.deepcopy(config.PRESET[name])
    path = Path(name).expanduser()
    builtin = ", ".join(n for n in config.PRESET if n != "ia3")
    if path.suffix.lower() != ".toml" or not path.is_file():
        raise UserInputError(
            f"network.lycoris_preset = {name!r}: neither one of LyCORIS's presets ({builtin}) nor a preset TOML file"
        )
    import toml  # what lycoris's own read_preset parses preset files with (a dependency of lycoris-lora)
    from lycoris.config_sdk import PresetConfig, PresetValidationError

    try:
        preset = PresetConfig.from_dict(toml.load(path)).to_dict()
    except (toml.TomlDecodeError, PresetValidationError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: not a LyCORIS preset file: {e}") from None
    for table in ("module_algo_map", "name_algo_map"):
        for target, override in preset.get(table, {}).items():
            algo = str(override.get("algo", "locon")).lower()
            if algo not in _OUR_ALGOS:
                raise UserInputError(
                    f"{path}: {table}.{target} trains LyCORIS algo {algo!r}; lorafuse trains and reads locon, loha "
                    "and lokr"
                )
    return preset


def _apply_preset(kohya, preset: dict, unet: nn.Module) -> None:
    """`preset` onto LycorisNetworkKohya with the two name fixes of the module docstring."""
    preset = {**_BLANK_PRESET, **preset}
    classes = list(preset["unet_target_module"])
    classes += [_CLASS_ALIASES[c] for c in classes if c in _CLASS_ALIASES]
    selected = [path for path, m in unet.named_modules() if type(m).__name__ in classes]
    names = [n for n in preset["unet_target_name"] if not any(n.startswith(f"{p}.") for p in selected)]
    kohya.LycorisNetworkKohya.apply_preset(
        {**preset, "unet_target_module": classes, "unet_target_name": names}
    )


@dataclass
class LycorisNetwork(TrainableNetwork):
    """The trainable LyCORIS network, with the interface of `LoraNetwork` that the training loop uses."""

    components: dict[str, nn.Module]
    plan: dict[str, dict[str, tuple[int, float]]]  # component -> LyCORIS module name -> (rank, alpha)
    net: Any  # lycoris.kohya.LycorisNetworkKohya
    net_cfg: NetworkConfig

    def _modules(self, component: str | None = None):
        for module in [*self.net.text_encoder_loras, *self.net.unet_loras]:
            comp = "unet" if module.lora_name.startswith("lora_unet") else _te_component(module.lora_name)
            if component is None or comp == component:
                yield comp, module

    def named_parameters(self, component: str | None = None) -> dict[str, nn.Parameter]:
        return {
            f"{comp}.{m.lora_name}.{n}": p
            for comp, m in sorted(self._modules(component), key=lambda cm: (cm[0], cm[1].lora_name))
            for n, p in m.named_parameters()
        }

    def param_groups(self, unet_lr: float, text_encoder_lr: float) -> list[dict]:
        groups = []
        for comp in sorted(self.plan):
            params = list(self.named_parameters(comp).values())
            groups.append(
                {"params": params, "lr": unet_lr if comp == "unet" else text_encoder_lr, "name": comp}
            )
        return groups

    def save(
        self, path: Path, *, arch: str, base: object, training: Mapping, metadata: Mapping, dtype,
        format: str = "kohya",  # LyCORIS's own layout is the only one (TrainConfig refuses another)
    ) -> Path:  # fmt: skip
        """Write with LyCORIS's key layout (its state_dict), our ss_* / modelspec.* metadata, atomically."""
        from lorafuse.lora.formats.metadata import build_metadata, to_str
        from lorafuse.lora.io import save_tensors
        from lorafuse.lora.state import LoraState

        path = Path(path)
        meta = build_metadata(LoraState(modules={}), fmt="lycoris", arch=arch, path=path, training=training)
        cfg = self.net_cfg
        meta["ss_network_module"] = "lycoris.kohya"
        meta["ss_network_dim"], meta["ss_network_alpha"] = str(cfg.network_dim), str(cfg.network_alpha)
        args = {"algo": cfg.algo, "preset": cfg.lycoris_preset, "conv_dim": cfg.conv_dim or cfg.network_dim}
        args["conv_alpha"] = cfg.conv_alpha if cfg.conv_alpha is not None else cfg.network_alpha
        if cfg.algo == "lokr":
            args["factor"] = cfg.factor
        meta["ss_network_args"] = json.dumps(args)
        meta.update({str(k): to_str(v) for k, v in metadata.items()})
        return save_tensors(self.kohya_tensors(arch, base), path, meta, dtype)

    def kohya_tensors(self, arch: str, base: object) -> dict[str, torch.Tensor]:
        """LyCORIS's tensors under the module names our kohya writer uses: LyCORIS names modules after the
        diffusers paths it sees (`lora_te_encoder_...` under transformers 5, diffusers-named SDXL UNet blocks),
        while A1111 / ComfyUI expect kohya's (`lora_te_text_model_encoder_...`, SGM-named SDXL UNet blocks)."""
        rename = self.kohya_names(arch, base)
        out = {}
        for key, tensor in self.net.state_dict().items():
            stem, _, part = key.partition(".")
            out[f"{rename.get(stem, stem)}.{part}"] = tensor
        return out

    def kohya_names(self, arch: str, base: object) -> dict[str, str]:
        """LyCORIS module name -> the kohya name files carry for it."""
        from lorafuse.lora.io import kohya_layout
        from lorafuse.lora.keys import canonical_key, kohya_name

        layout = kohya_layout(arch, base)
        paths = {
            id(module): (comp, path)
            for comp, root in components_of(base).items()
            for path, module in root.named_modules()
        }
        rename = {}
        for _, module in self._modules():
            comp, path = paths[id(module.org_module[0])]
            rename[module.lora_name] = kohya_name(canonical_key(comp, path), arch, layout)
        return rename


def _te_component(name: str) -> str:
    return "text_encoder_2" if name.startswith("lora_te2") else "text_encoder"


def create_lycoris_network(pipe: object, net: NetworkConfig, arch: str) -> LycorisNetwork:
    """Inject a fresh LyCORIS network into `pipe` (seed the global torch RNG first: the factors' init draws)."""
    kohya = require("lycoris.kohya", "network_module = lycoris.kohya")
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        # accelerate syncs gradients of the wrapped UNet; LyCORIS's modules live outside it, so on several
        # processes their gradients would silently differ
        raise UserInputError("network_module = lycoris.kohya trains on one process only (no multi-GPU yet)")
    comps = components_of(pipe)
    for root in comps.values():
        root.requires_grad_(False)
    text_encoders = [comps[c] for c in ("text_encoder", "text_encoder_2") if c in comps]
    te_arg = text_encoders if len(text_encoders) > 1 else text_encoders[0]
    _apply_preset(kohya, lycoris_preset(net.lycoris_preset), comps["unet"])
    if net.network_weights is not None and net.dim_from_weights:
        from lorafuse.train.network_weights import lycoris_from_weights

        lyco = lycoris_from_weights(kohya, pipe, te_arg, net, arch)
    else:
        lyco = kohya.LycorisNetworkKohya(
            te_arg,
            comps["unet"],
            multiplier=1.0,
            lora_dim=net.network_dim,
            conv_lora_dim=net.conv_dim or net.network_dim,
            alpha=net.network_alpha,
            conv_alpha=net.conv_alpha if net.conv_alpha is not None else net.network_alpha,
            dropout=net.network_dropout,
            network_module=net.algo,
            factor=net.factor,
        )
    lyco.apply_to(
        text_encoders, comps["unet"], apply_text_encoder=net.train_text_encoder, apply_unet=net.train_unet
    )
    device = next(comps["unet"].parameters()).device
    lyco.to(device=device, dtype=torch.float32)
    plan: dict[str, dict[str, tuple[int, float]]] = {}
    network = LycorisNetwork({}, plan, lyco, net)
    for comp, module in network._modules():
        if (comp == "unet" and not net.train_unet) or (comp != "unet" and not net.train_text_encoder):
            continue
        plan.setdefault(comp, {})[module.lora_name] = (int(getattr(module, "lora_dim", net.network_dim)), 0.0)
    if not plan:
        raise UserInputError("LyCORIS found no module to train in this base (network_module = lycoris.kohya)")
    network.components.update({c: comps[c] for c in plan})
    if net.network_weights is not None and not net.dim_from_weights:
        from lorafuse.train.network_weights import load_lycoris_weights, read_weights

        read_weights(net.network_weights, pipe, arch, lycoris=True)  # family and modules, as networks.lora's
        load_lycoris_weights(network, net.network_weights, arch, pipe)
    for param in network.named_parameters().values():
        param.requires_grad_(True)
    return network
