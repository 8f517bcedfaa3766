"""CRAFT-LoRA (CRAFT-LoRA paper; docs/algorithms.md §7): disjoint content/style layers, prompt markers and asymmetric CFG.

    W_cond(i) = W' + ω_c(i) ΔW_c|I_c + ω_s(i) ΔW_s|I_s       conditional rows
    W_uncond  = W'                                            unconditional rows
    ε̂ = ε_u + g (ε_c − ε_u)                                   (`guidance.acfg.AsymmetricCFG`)

Notation map: `W'` the rank-limited backbone (option `backbone`, a folder from `lorafuse craft backbone`; none
means W' = W, the "no backbone" ablation); I_c / I_s the layer sets (`content_layers` / `style_layers`: a layer
preset, regexes, or "lora" for the modules the LoRA itself covers); `lambda_c` / `lambda_s` λ_c / λ_s;
ω_c(i) = w_c λ_c σ_c(i) with w_c = `content_weight` and σ_c the schedule (`schedule`: "window", "smooth",
"constant"), likewise ω_s. `acfg_mechanism`: "merged" (default) runs the [uncond | cond] rows as two half-batch
passes on merged weights (`lora.row_split`), "peft" with peft's per-sample adapters; same images up to rounding.

Where λ comes from, first match wins: the options lambda_c / lambda_s; the expert encoder (`expert`, a file from
`expert.save_expert`) on the prompt's spans, times marker presence; the markers of `prompt` (1 if present,
else 0); without a prompt, 1 and 1. The prompt the text encoder sees must have its markers removed:
`Craft.prepare_prompt(prompt, config)` returns that prompt and the config with `prompt` set.

Routing: each LoRA keeps only its modules inside its layer set (UNet only; text-encoder modules are dropped,
as the paper trains UNet layers only); a LoRA with no module in its set is an error naming the file, and
overlapping sets are an error naming the shared modules. Both parts are injected as ONE peft adapter, whose
layer groups get ω_c / ω_s per step; `plan.close()` removes it and restores the base weights exactly.

Where CRAFT's parts live (each in the lowest package that can hold it):
    fusion/craft/__init__.py   the method: options, routing, plan            fusion/markers.py  the <c>/<s> grammar
    fusion/craft/prompts.py    λ from markers                                fusion/craft/host.py  hosting W'
    fusion/craft/expert.py     the expert encoder (λ from the spans)         fusion/craft/expert_data.py  its data
    guidance/acfg.py           asymmetric CFG, the branch adapter            lora/row_split.py  merged-row layers
    families (lora/presets.py) the craft_content / craft_style layer sets    backbone/  the rank-limited W'
    eval/expert_world.py       the expert trained and scored on the world    cli/craft.py  `lorafuse craft ...`
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafuse.errors import UserInputError
from lorafuse.families import family_of
from lorafuse.fusion.common import is_denoiser, lora_label, resolve
from lorafuse.fusion.craft.prompts import aggregation_weights
from lorafuse.fusion.markers import MarkedPrompt, common_markers, strip_markers
from lorafuse.fusion.registry import (
    FusionConfig,
    FusionMethod,
    FusionPlan,
    check_choice,
    check_range,
    register,
)
from lorafuse.guidance.acfg import MECHANISMS, SCHEDULE_KINDS, AcfgSchedule, AsymmetricCFG, BranchAdapter
from lorafuse.lora.state import LoraState
from lorafuse.lora.validate import LoraCoverageWarning

NAME = "craft"
ADAPTER = "craft"
FROM_LORA = "lora"  # a layer set given as "the modules this LoRA covers"

__all__ = ["ADAPTER", "Craft", "CraftConfig", "craft_layer_sets", "route_lora"]


@dataclass
class CraftConfig(FusionConfig):
    """Options of the "craft" method; see the module docstring. Windows are fractions of the run."""

    prompt: str | None = None
    lambda_c: float | None = None
    lambda_s: float | None = None
    schedule: str = "window"
    content_window: tuple[float, float] = (0.0, 0.7)
    style_window: tuple[float, float] = (0.28, 1.0)
    symmetric: bool = False
    backbone: Path | None = None
    content_layers: str | tuple[str, ...] = "craft_content"
    style_layers: str | tuple[str, ...] = "craft_style"
    expert: Path | None = None
    concept_id: int = 0
    acfg_mechanism: str = "merged"

    def validate(self, method: str) -> None:
        super().validate(method)
        check_choice(method, "schedule", self.schedule, SCHEDULE_KINDS)
        check_choice(method, "acfg_mechanism", self.acfg_mechanism, MECHANISMS)
        for name in ("lambda_c", "lambda_s"):
            if getattr(self, name) is not None:
                check_range(method, name, getattr(self, name), -4.0, 4.0)
        for name in ("content_window", "style_window"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi <= 1.0:
                raise UserInputError(f"{method}: option {name}=({lo}, {hi}) needs 0 <= start <= end <= 1")
        for name in ("content_layers", "style_layers"):
            value = getattr(self, name)
            if not value or (not isinstance(value, str) and not all(isinstance(v, str) and v for v in value)):
                raise UserInputError(
                    f"{method}: option {name} must be a preset name, 'lora' or a list of regexes"
                )
        check_range(method, "concept_id", self.concept_id, 0, 10**9, integer=True)
        for name in ("backbone", "expert"):
            path = getattr(self, name)
            if path is not None and not Path(path).expanduser().exists():
                raise UserInputError(f"{method}: option {name}={str(path)!r}: no such file or folder")
        if self.prompt is not None:
            common_markers([self.prompt])  # malformed markers fail here, before any work


def craft_layer_sets(pipe: Any, config: CraftConfig) -> tuple[list[str] | None, list[str] | None]:
    """(I_c, I_s) as UNet module paths; None for a set given as "lora" (the LoRA's own coverage)."""
    from lorafuse.lora.presets import resolve_layers

    out: list[list[str] | None] = []
    for value in (config.content_layers, config.style_layers):
        if value == FROM_LORA:
            out.append(None)
        else:
            out.append(resolve_layers(pipe, value if isinstance(value, str) else list(value)))
    return out[0], out[1]


def route_lora(pipe: Any, state: LoraState, layers: list[str] | None, role: str) -> tuple[LoraState, dict]:
    """The part of `state` on the UNet modules `layers` (all its UNet modules when None), and a record.

    No module in the set is an error naming the file (the fused image would silently lack this LoRA)."""
    label = lora_label(state, role)
    targets = resolve(pipe, state)
    unet_keys = {k: ref.path for k, ref in targets.items() if is_denoiser(ref)}
    allowed = set(unet_keys.values()) if layers is None else set(layers)
    kept = {k: p for k, p in unet_keys.items() if p in allowed}
    if not kept:
        raise UserInputError(
            f"{NAME}: {label} has no module in the {role} layers I_{role[0]} ({len(allowed)} modules, e.g. "
            f"{sorted(allowed)[0] if allowed else 'none'}); it covers {len(unet_keys)} other denoiser modules. "
            f"Train it with layer preset craft_{role}, or pass {role}_layers='lora' or a list of regexes"
        )
    dropped = len(state.modules) - len(kept)
    if dropped:
        warnings.warn(
            f"{label}: {NAME} uses {len(kept)} of its {len(state.modules)} modules (those in I_{role[0]}); "
            f"the other {dropped} are not applied",
            LoraCoverageWarning,
            stacklevel=3,
        )
    part = LoraState(
        modules={k: state.modules[k] for k in kept},
        metadata=dict(state.metadata),
        source_format=state.source_format,
        source_path=state.source_path,
        source_names={k: v for k, v in state.source_names.items() if k in kept},
    )
    return part, {"paths": sorted(kept.values()), "kept_modules": len(kept), "dropped_modules": dropped}


def _check_disjoint(content_paths: Sequence[str], style_paths: Sequence[str]) -> None:
    shared = sorted(set(content_paths) & set(style_paths))
    if shared:
        raise UserInputError(
            f"{NAME}: content layers I_c and style layers I_s must be disjoint, but {len(shared)} modules are in "
            f"both: {', '.join(shared[:6])}{' ...' if len(shared) > 6 else ''}. Choose other content_layers / "
            "style_layers, or LoRAs trained on the craft_content / craft_style presets"
        )


def _lambdas(pipe: Any, config: CraftConfig, parsed: MarkedPrompt | None) -> tuple[float, float, str]:
    """(λ_c, λ_s, where they came from): options, else expert encoder x markers, else markers, else 1 and 1."""
    lc, ls = aggregation_weights(parsed)
    source = "markers" if parsed is not None else "default (no prompt given)"
    if config.expert is not None and (config.lambda_c is None or config.lambda_s is None):
        if parsed is None:
            raise UserInputError(
                f"{NAME}: option expert needs the marked prompt (option prompt) to read spans from"
            )
        from lorafuse.fusion.craft.expert import load_expert, pipeline_text_embedder

        expert = load_expert(config.expert)
        pred_c, pred_s = expert.predict(
            pipeline_text_embedder(pipe),
            config.concept_id,
            parsed.content_span or "",
            parsed.style_span or "",
        )
        # an absent marker keeps its branch off whatever the encoder says (CRAFT-LoRA paper §3.4.1)
        lc, ls, source = lc * pred_c, ls * pred_s, "expert encoder x markers"
    override_c, override_s = aggregation_weights(parsed, config.lambda_c, config.lambda_s)
    if config.lambda_c is not None:
        lc, source = override_c, source + ", lambda_c option"
    if config.lambda_s is not None:
        ls, source = override_s, source + ", lambda_s option"
    return lc, ls, source


@register
class Craft(FusionMethod):
    name = NAME
    config_cls = CraftConfig
    lora_layers = "craft"
    paper_inputs = ("craft", {})
    summary = (
        "CRAFT-LoRA: content LoRA on I_c, style LoRA on I_s (disjoint), asymmetric timestep-aware CFG "
        "(LoRAs on the conditional branch only), optional rank-limited backbone"
    )

    @staticmethod
    def prepare_prompt(
        prompt: str | Sequence[str], config: CraftConfig
    ) -> tuple[str | list[str], CraftConfig]:
        """(the prompt(s) for the text encoder, `config` with the marked prompt set for λ)."""
        parsed = common_markers([prompt] if isinstance(prompt, str) else list(prompt))
        return strip_markers(prompt), dataclasses.replace(config, prompt=parsed.raw)

    def _build(self, plan: FusionPlan, pipe: Any, content: LoraState, style: LoraState, config: CraftConfig) -> None:
        # 1. Aggregation weights λ from the markers (and the expert encoder, when given)
        parsed = common_markers([config.prompt]) if config.prompt is not None else None
        lambda_c, lambda_s, source = _lambdas(pipe, config, parsed)

        # 2. Route each LoRA to its layer set; the sets must not share a module
        layers_c, layers_s = craft_layer_sets(pipe, config)
        if layers_c is not None and layers_s is not None:
            _check_disjoint(layers_c, layers_s)
        part_c, info_c = route_lora(pipe, content, layers_c, "content")
        part_s, info_s = route_lora(pipe, style, layers_s, "style")
        _check_disjoint(info_c["paths"], info_s["paths"])

        # 3. Host: the backbone W' replaces the base UNet weights (restored on close)
        if config.backbone is not None:
            plan.record["backbone"] = _host_backbone(pipe, config.backbone, plan.undo)
        # 4. One adapter holding ΔW_c on I_c and ΔW_s on I_s
        adapter = _inject(pipe, part_c, part_s, info_c["paths"], info_s["paths"], plan.undo,
                          config.acfg_mechanism)  # fmt: skip
        schedule = AcfgSchedule(
            kind=config.schedule,
            lambda_c=config.content_weight * lambda_c,
            lambda_s=config.style_weight * lambda_s,
            content_window=tuple(config.content_window),
            style_window=tuple(config.style_window),
        )
        plan.record.update(
            lambda_c=lambda_c, lambda_s=lambda_s, lambda_source=source,
            encoder_prompt=parsed.clean if parsed else None,
            content_span=parsed.content_span if parsed else None, style_span=parsed.style_span if parsed else None,
            content={k: v for k, v in info_c.items() if k != "paths"} | {"layers": len(info_c["paths"])},
            style={k: v for k, v in info_s.items() if k != "paths"} | {"layers": len(info_s["paths"])},
        )  # fmt: skip
        record = plan.record
        plan.guidance = lambda scale: AsymmetricCFG(scale, adapter, schedule, config.symmetric, record)


def _host_backbone(pipe: Any, folder: Path, undo: list) -> dict[str, Any]:
    from lorafuse.fusion.craft.host import backbone_info, load_backbone_state, swap_unet_weights

    state = load_backbone_state(folder)
    restore, swapped = swap_unet_weights(family_of(pipe).denoiser(pipe), state, str(folder))
    undo.append(restore)
    return {"folder": str(folder), "swapped_tensors": swapped, "info": backbone_info(folder)}


def _inject(pipe: Any, part_c: LoraState, part_s: LoraState, paths_c: list[str], paths_s: list[str],
            undo: list, mechanism: str) -> BranchAdapter:  # fmt: skip
    from lorafuse.lora.inject import delete_adapter, inject_lora

    combined = LoraState(
        modules={**part_c.modules, **part_s.modules},
        metadata={},
        source_format="craft",
        source_path=f"{lora_label(part_c, 'content')} | {lora_label(part_s, 'style')}",
        source_names={**part_c.source_names, **part_s.source_names},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraCoverageWarning)  # routing already warned about what it dropped
        inject_lora(pipe, combined, ADAPTER, 1.0)
    undo.append(lambda: delete_adapter(pipe, ADAPTER))
    adapter = BranchAdapter(family_of(pipe).denoiser(pipe), ADAPTER, paths_c, paths_s, mechanism)
    undo.append(adapter.close)  # LIFO: the row-split wrappers come off before the adapter is deleted
    return adapter
