"""The trainable LoRA: peft layers on the chosen modules, with kohya's ranks and alphas, exported as `LoraState`.

Notation (docs/algorithms.md §0): ΔW = (alpha / r) · B A, B = `lora_B` = kohya `lora_up`, A = `lora_A` = `lora_down`.
peft initialises A with kaiming-uniform and B with zeros, as kohya does, so training starts at the base model.

Ranks and alphas, per module (kohya's rules, `NetworkConfig` fields):
- Linear and 1x1 convs: network_dim / network_alpha;
- 3x3 convs (LoCon): conv_dim / conv_alpha (conv_alpha unset: 1.0, as kohya); selected without conv_dim (presets
  `all`, `craft_style`, or regexes), they take network_dim / network_alpha;
- `default` with conv_dim set is kohya's LoCon, i.e. the `all` preset;
- block_dims / block_alphas: one entry per SGM block in kohya's order IN00.., MID, OUT00.. (25 entries for SD1.5,
  19 for SDXL, 13 for the world UNet); they replace network_dim / network_alpha for the block's Linear and 1x1
  modules, a 0 removes them; 3x3 convs take conv_block_dims / conv_block_alphas for their block when set (block
  mode only, as kohya), else conv_dim / conv_alpha, whatever block_dims says (kohya's rule).
- text encoders (unless network_train_unet_only): q/k/v/out projections and fc1/fc2 of every CLIP layer, as
  kohya, with network_dim / network_alpha.
  Which encoders: the family's `trainable_text_encoders` (SDXL both CLIPs, FLUX.1 CLIP-L only, never T5).
- a transformer denoiser (FLUX.1): every module `network.layers` selects (presets all/default, double, single,
  or regexes), network_dim / network_alpha; kohya's UNet block dims and block LRs do not apply and are refused.
Dropout is peft's `lora_dropout` (on the LoRA branch's input); kohya's `network_dropout` drops the rank features
after `lora_down` instead. Both regularise; the numbers are not interchangeable between the two tools.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from lorafuse.errors import UserInputError
from lorafuse.families import Family, get_family
from lorafuse.lora.keys import UnetLayout, canonical_key, unet_to_sgm
from lorafuse.lora.presets import detect_arch, resolve_layers
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import components_of
from lorafuse.train.block_lr import block_lr_weights, module_lr_weight
from lorafuse.train.config import NetworkConfig
from lorafuse.train.network_base import TrainableNetwork

ADAPTER = "lorafuse_train"
TEXT_ENCODER_TARGETS = re.compile(
    r"(^|\.)encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$"
)
KOHYA_CONV_ALPHA = 1.0  # kohya's conv_alpha when conv_dim is set without it
_BLOCKWISE = (
    "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight",
    "up_lr_weight",
)
_SGM_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.|^middle_block\.")

Plan = dict[str, dict[str, tuple[int, float]]]  # component -> module path -> (rank, alpha)


def block_labels(unet: nn.Module) -> list[str]:
    """kohya's block names of this UNet in order: IN00.., MID, OUT00.. (the meaning of block_dims entries)."""
    n = unet.config.layers_per_block
    n = n if isinstance(n, int) else n[0]
    n_in = len(unet.config.down_block_types) * (n + 1)
    n_out = len(unet.config.up_block_types) * (n + 1)
    return [f"IN{i:02d}" for i in range(n_in)] + ["MID"] + [f"OUT{i:02d}" for i in range(n_out)]


def block_of(path: str, layout: UnetLayout) -> str | None:
    """'down_blocks.1.attentions.0.proj_in' -> 'IN04' (SD1.5 layout); None outside the numbered blocks."""
    sgm = unet_to_sgm(path, layout)
    m = _SGM_BLOCK.match(sgm or "")
    if m is None:
        return None
    if m.group(1) is None:
        return "MID"
    return f"{'IN' if m.group(1) == 'input_blocks' else 'OUT'}{int(m.group(2)):02d}"


def is_3x3_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def plan_network(pipe: object, net: NetworkConfig, arch: str | None = None) -> Plan:
    """Which modules get a LoRA and with which (rank, alpha); see the module docstring for the rules."""
    comps = components_of(pipe)
    family = get_family(arch or detect_arch(pipe))
    plan: Plan = {}
    if net.train_unet:
        name = family.denoiser_component
        plan[name] = _denoiser_plan(comps[name], net, family)
    if net.train_text_encoder:
        for name in family.trainable_text_encoders:
            if name in comps:
                found = {
                    path: (net.network_dim, float(net.network_alpha))
                    for path, module in comps[name].named_modules()
                    if TEXT_ENCODER_TARGETS.search(path) and isinstance(module, nn.Linear)
                }
                if not found:
                    raise UserInputError(f"{name}: no CLIP attention / MLP layers found to train")
                plan[name] = found
    if not plan:
        raise UserInputError("nothing to train: the base has none of the components the network asks for")
    return plan


def _denoiser_plan(denoiser: nn.Module, net: NetworkConfig, family: Family) -> dict[str, tuple[int, float]]:
    layers = "all" if net.layers == "default" and (net.conv_dim or net.conv_block_dims) else net.layers
    if "up_block_types" not in denoiser.config:  # a transformer: no kohya IN/MID/OUT blocks
        blockwise = [k for k in _BLOCKWISE if getattr(net, k) is not None]
        if blockwise:
            raise UserInputError(
                f"network.{blockwise[0]} numbers kohya's UNet blocks (IN00.., MID, OUT00..); {family.label} has a "
                "transformer: select its blocks with network.layers (double, single, or regexes by index)"
            )
        return {path: (net.network_dim, float(net.network_alpha))
                for path in resolve_layers(denoiser, layers, family.name)}  # fmt: skip
    labels = block_labels(denoiser)
    sizes = {len(labels), KOHYA_SDXL_BLOCKS} if len(labels) == 19 else {len(labels)}  # SDXL: kohya's 23 too
    for key in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        values = getattr(net, key)
        if values is not None and len(values) not in sizes:
            raise UserInputError(
                f"network.{key} has {len(values)} entries, this {family.name} UNet has {len(labels)} blocks "
                f"({labels[0]}..{labels[-1]} in kohya's order IN.., MID, OUT..)"
                + (f", or kohya's SDXL layout of {KOHYA_SDXL_BLOCKS}" if len(sizes) == 2 else "")
            )
    layout = UnetLayout.from_config(denoiser.config)
    lr_weights = block_lr_weights(net, labels) or {}
    targets: dict[str, tuple[int, float]] = {}
    for path in resolve_layers(denoiser, layers, family.name):
        block = block_of(path, layout)
        if block is not None and module_lr_weight(lr_weights, block, _mid(path, layout)) <= net.block_lr_zero_threshold:
            continue  # kohya drops blocks whose LR weight is at or below the threshold
        slot = None if block is None else _Slot(labels, block, _mid(path, layout))
        if is_3x3_conv(denoiser.get_submodule(path)) and (net.conv_dim or net.conv_block_dims):
            rank, alpha = _conv_rank(net, slot)
        else:  # as kohya: block_dims / block_alphas rank the Linear and 1x1 layers only
            rank, alpha = net.network_dim, net.network_alpha
            if slot is not None and net.block_dims is not None:
                rank = slot.of(net.block_dims)
            if slot is not None and net.block_alphas is not None:
                alpha = slot.of(net.block_alphas)
        if rank:
            targets[path] = (int(rank), float(alpha))
    if not targets:
        raise UserInputError("network.block_dims removes every UNet module: nothing left to train")
    return targets


KOHYA_SDXL_BLOCKS = 23  # kohya's SDXL lists: embeddings, IN00-08, middle_block 0-2, OUT00-08, out


def _mid(path: str, layout: UnetLayout) -> int | None:
    """N of middle_block.N (SGM) for a mid-block module, else None."""
    sgm = unet_to_sgm(path, layout) or ""
    return int(sgm.split(".")[1]) if sgm.startswith("middle_block.") else None


@dataclass(frozen=True)
class _Slot:
    """A module's entry in a per-block list: ours (one per label) or kohya's 23-entry SDXL layout."""

    labels: list[str]
    block: str
    mid: int | None

    def of(self, values):
        if len(values) == len(self.labels):
            return values[self.labels.index(self.block)]
        if self.block == "MID":
            return values[10 + (self.mid or 0)]
        k = int(self.block[-2:])
        return values[1 + k if self.block.startswith("IN") else 13 + k]


def _conv_rank(net: NetworkConfig, slot: _Slot | None) -> tuple[int, float]:
    """A 3x3 conv's (rank, alpha): conv_block_dims / conv_block_alphas for its block, else conv_dim / conv_alpha."""
    alpha = net.conv_alpha if net.conv_alpha is not None else KOHYA_CONV_ALPHA
    if net.conv_block_dims is None or slot is None:
        return net.conv_dim or 0, alpha
    if net.conv_block_alphas is not None:
        alpha = slot.of(net.conv_block_alphas)
    return slot.of(net.conv_block_dims), alpha


def _peft_config(targets: Mapping[str, tuple[int, float]], dropout: float):
    from peft import LoraConfig

    r0 = Counter(r for r, _ in targets.values()).most_common(1)[0][0]
    a0 = Counter(a for _, a in targets.values()).most_common(1)[0][0]
    return LoraConfig(
        r=r0,
        lora_alpha=a0,
        # a string is full-matched by peft: exact module paths, never a suffix of another module's path
        target_modules="(?:" + "|".join(re.escape(p) for p in sorted(targets)) + ")",
        # pattern keys are regexes matched at the end of a module path; escaped full paths match one module
        rank_pattern={re.escape(p): r for p, (r, _) in targets.items() if r != r0},
        alpha_pattern={re.escape(p): a for p, (_, a) in targets.items() if a != a0},
        lora_dropout=dropout,
        bias="none",
        init_lora_weights=True,  # A kaiming-uniform, B = 0: ΔW = 0 at step 0, as kohya
    )


@dataclass
class LoraNetwork(TrainableNetwork):
    """The injected, trainable LoRA of a pipeline. `parameters` are the only tensors the optimiser sees."""

    components: dict[str, nn.Module]
    plan: Plan
    adapter: str = ADAPTER
    lr_weights: dict[str, float] = field(default_factory=dict)  # UNet module path -> block LR weight (kohya)

    def layers(self, component: str):
        from peft.tuners.lora import LoraLayer

        root = self.components[component]
        for path in sorted(self.plan.get(component, {})):
            layer = root.get_submodule(path)
            assert isinstance(layer, LoraLayer) and self.adapter in layer.lora_A, path
            yield path, layer

    def named_parameters(self, component: str | None = None) -> dict[str, nn.Parameter]:
        """'unet.<peft parameter name>' -> parameter, in a fixed order (the optimiser's and the checkpoint's)."""
        out: dict[str, nn.Parameter] = {}
        for comp in sorted(self.plan) if component is None else [component]:
            for name, param in self.components[comp].named_parameters():
                if f".{self.adapter}." in f".{name}." and "lora_" in name:
                    out[f"{comp}.{name}"] = param
        return out

    def param_groups(self, unet_lr: float, text_encoder_lr: float) -> list[dict]:
        """One group per component; with block LR weights, one UNet group per distinct weight ("unet" keeps the
        weight-1 group, so the log's lr_unet stays the base LR)."""
        groups = []
        for comp in sorted(self.plan):
            is_te = comp.startswith("text_encoder")
            lr = text_encoder_lr if is_te else unet_lr
            group = comp if is_te else "unet"  # kohya's name for the denoiser's LR (unet_lr), UNet or transformer
            if is_te or not self.lr_weights:
                groups.append({"params": list(self.named_parameters(comp).values()), "lr": lr, "name": group})
                continue
            by_weight: dict[float, list[nn.Parameter]] = {}
            for path, layer in self.layers(comp):
                weight = self.lr_weights.get(path, 1.0)
                params = [
                    p for n, p in layer.named_parameters() if f".{self.adapter}." in f".{n}." and "lora_" in n
                ]
                by_weight.setdefault(weight, []).extend(params)
            for weight, params in sorted(by_weight.items(), key=lambda wp: wp[0] != 1.0):
                name = group if weight == 1.0 else f"{group}_x{weight:g}"
                groups.append({"params": params, "lr": lr * weight, "name": name})
        return groups

    def save(
        self, path, *, arch: str, base: object, training: Mapping, metadata: Mapping, dtype, format: str = "kohya"
    ) -> object:
        """Write the LoRA file (kohya or diffusers format) at `dtype` (save_precision)."""
        from lorafuse.lora.io import save_lora

        return save_lora(
            self.to_lora_state(),
            path,
            format=format,
            arch=arch,
            base=base,
            training=training,
            metadata=metadata,
            dtype=dtype,
        )

    def to_lora_state(self, metadata: Mapping[str, str] | None = None) -> LoraState:
        """The canonical `LoraState` (kohya-ready keys): down = A, up = B, alpha = peft's lora_alpha."""
        modules: dict[str, LoraModule] = {}
        for comp in sorted(self.plan):
            for path, layer in self.layers(comp):
                modules[canonical_key(comp, path)] = LoraModule(
                    down=layer.lora_A[self.adapter].weight.detach().float().clone(),
                    up=layer.lora_B[self.adapter].weight.detach().float().clone(),
                    alpha=float(layer.lora_alpha[self.adapter]),
                )
        return LoraState(modules=modules, metadata=dict(metadata or {}), source_format="lorafuse_train")


def create_network(pipe: object, net: NetworkConfig, arch: str | None = None) -> LoraNetwork:
    """Inject a fresh trainable LoRA into `pipe` (in place). Seed the global torch RNG first: A's init draws.

    Base weights are frozen; LoRA parameters are float32 whatever the base dtype (mixed precision trains the
    factors in full precision, as diffusers' `cast_training_params`). network_module = lycoris.kohya gives a
    `LycorisNetwork` (train/network_lycoris.py) with the same interface.
    """
    import warnings

    if net.network_module == "lycoris.kohya":
        from lorafuse.train.network_lycoris import create_lycoris_network

        family = get_family(arch or detect_arch(pipe))
        if family.denoiser_component != "unet":
            raise UserInputError(
                f"network.network_module = 'lycoris.kohya' trains UNet bases here; for {family.label} use "
                "networks.lora (kohya's networks.lora_flux)"
            )

        return create_lycoris_network(pipe, net, arch or detect_arch(pipe))

    from peft import inject_adapter_in_model

    weights = None
    if net.network_weights is not None:
        from lorafuse.train.network_weights import plan_from_weights, read_weights

        weights = read_weights(net.network_weights, pipe, arch or detect_arch(pipe))
    plan = plan_from_weights(*weights) if weights and net.dim_from_weights else plan_network(pipe, net, arch)
    if weights is not None and not net.dim_from_weights:
        from lorafuse.train.network_weights import check_plan

        check_plan(*weights, plan, pipe, net)
    comps = components_of(pipe)
    for root in comps.values():
        root.requires_grad_(False)
    for comp, targets in plan.items():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(
                _peft_config(targets, net.network_dropout), comps[comp], adapter_name=ADAPTER
            )
    network = LoraNetwork({c: comps[c] for c in plan}, plan)
    if "unet" in plan:
        block_weights = block_lr_weights(net, block_labels(comps["unet"]))
        if block_weights:
            layout = UnetLayout.from_config(comps["unet"].config)
            network.lr_weights = {
                p: module_lr_weight(block_weights, block_of(p, layout), _mid(p, layout)) for p in plan["unet"]
            }
    for param in network.named_parameters().values():
        param.data = param.data.float()
        param.requires_grad_(True)
    for comp in plan:
        if len(list(network.layers(comp))) != len(plan[comp]):  # layers() asserts each one is a LoRA layer
            raise RuntimeError(f"peft injected a different set of {comp} modules than planned")
    if weights is not None:
        from lorafuse.train.network_weights import copy_weights

        copy_weights(network, *weights, net.network_weights)
    return network
