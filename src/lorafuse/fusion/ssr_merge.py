"""SSR-Merge (docs/algorithms.md §10; Wei et al., "Subspace Signal Routing for Training-Free LoRA Merging in Diffusion Models", ICML 2026,
arXiv 2606.10617; public code nagara214/SSR-Merge): a closed-form merge that routes each LoRA's signal back into
its own subspace instead of adding parameters.

Per LoRA'd layer l that both LoRAs cover (§3 of the paper; K = 2 tasks here, content c and style s):
    A = [A_c ; A_s]                   (r_c + r_s, in)     the unified subspace: ranks concatenated
    B = [w_c s_c B_c | w_s s_s B_s]   (out, r_c + r_s)
    z = A x,  z_k = A_k x             signals of a layer input x
    G = Σ_k Σ_{x ∈ X_k} z zᵀ          correlation of the mixed signals over both calibration runs
    Q = Σ_k E_k Σ_{x ∈ X_k} z_k zᵀ    directional guide: task k's own signal, written into its block (E_k)
    R = (Q / N) (G / N + λ I)⁻¹       the router; N = number of calibration tokens
    ΔW_l = B R A                       a plain LoRA of rank r_c + r_s (B' = B R, A unchanged)
X_k are the inputs layer l sees while the model with LoRA k alone (at weight w_k) denoises task k's calibration
prompt. R is the ridge least-squares solution of min_R Σ_k ‖R Z_k − E_k H_k‖² (H_k = A_k X_k): on task k's own
activations the merged layer reproduces B_k A_k x and suppresses the other LoRA's response (the paper's OLS
argument). A layer only one LoRA covers keeps that LoRA's update (identity routing, as the official code).

Notation map: `content`/`style` are (A_c, B_c)/(A_s, B_s) with s_k = alpha/r folded into B; `ridge` λ;
`content_prompt`/`style_prompt` the calibration prompts (the official demo's "a sks cat" / "a sks dog"); when not
given they come from the fused prompt's CRAFT markers (`<c>` span for content, `<s>` span for style), else the
whole prompt serves both; `calib_steps` how many of the noisiest steps of a `calib_schedule_steps`-step run feed
the statistics; `seed` the calibration noise (the same for both tasks, as the official runner).

Pitfalls of the public code, and what we do:
- Calibration length: the official runner calls the pipeline with `num_inference_steps=1`. On its flow-matching
  backbones (FLUX, Qwen-Image, Z-Image) that one step is at σ = 1, the noisiest. On SD-family DDIM ("leading"
  spacing) a 1-step schedule is t = 1, an almost clean timestep fed pure noise. We take the first `calib_steps`
  steps of a normal `calib_schedule_steps`-step schedule, so "1 step" means the noisiest step on every base.
- Non-Linear layers: the official hooks attach to `nn.Linear` only; any other LoRA'd layer gets no activations and
  falls back to R = I, which is the direct sum B A. SD UNets have 1x1-conv proj_in/out (SD1.5) and LoCon LoRAs put
  much of a style in 3x3 convs, so we route convs too (z = conv(x, A), tokens = batch x positions).
  `route_convs=False` reproduces the official behaviour.
- The ridge λ is relative to the token-mean statistics (G / N), not to G.
- CFG: the official backbones are guidance-distilled (one forward per step). With CFG both the unconditional and
  the conditional rows pass through each layer and both enter G and Q (as the official hooks would see them).
- Text encoders: the official code merges the denoiser only. Text-encoder modules here are the direct sum
  w_c ΔW_c + w_s ΔW_s (prompts are encoded once, as in direct merging).
- The official runner silently drops a LoRA whose calibration raised, and a layer without activations falls back
  to identity routing without a word; here a failed calibration run raises, and a layer without activations is
  an error naming it.
- Weights are emitted in float32 (the official default output is bf16).

Cost: 2 x `calib_steps` guided forwards, then one (r_c + r_s)² solve per layer; the result is fused into the
weights, so sampling costs what the base model costs. `plan.close()` restores the base exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafuse.errors import LorafuseError, UserInputError
from lorafuse.fusion.common import fuse_sum, is_denoiser, layer_factors, resolve, split_state
from lorafuse.fusion.markers import common_markers, strip_markers
from lorafuse.fusion.registry import FusionConfig, FusionMethod, FusionPlan, check_range, register
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import ModuleRef, components_of

NAME = "ssr"


@dataclass
class SsrConfig(FusionConfig):
    """Options of SSR-Merge; see the module docstring."""

    content_prompt: str | None = None
    style_prompt: str | None = None
    prompt: str | None = None  # set by prepare_prompt: the fused prompt, for prompts not given
    ridge: float = 1e-4
    calib_steps: int = 1
    calib_schedule_steps: int = 25
    calib_guidance: float | None = None  # None: the family's default guidance (CFG on SD, none on FLUX.1)
    seed: int = 42
    route_convs: bool = True

    def validate(self, method: str) -> None:
        super().validate(method)
        check_range(method, "ridge", self.ridge, 0.0, 1e6)
        check_range(method, "calib_schedule_steps", self.calib_schedule_steps, 1, 1000, integer=True)
        check_range(method, "calib_steps", self.calib_steps, 1, self.calib_schedule_steps, integer=True)
        if self.calib_guidance is not None:
            check_range(method, "calib_guidance", self.calib_guidance, 0.0, 100.0)
        check_range(method, "seed", self.seed, 0, 2**63 - 1, integer=True)
        for name in ("content_prompt", "style_prompt", "prompt"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise UserInputError(f"{method}: option {name} must be a non-empty string, got {value!r}")
        if not isinstance(self.route_convs, bool):
            raise UserInputError(f"{method}: option route_convs={self.route_convs!r} must be true or false")

    def calibration_prompts(self) -> tuple[str, str]:
        """(content prompt, style prompt): the options, else the fused prompt's marked spans, else the prompt."""
        parsed = common_markers([self.prompt]) if self.prompt else None
        out = []
        for given, role in ((self.content_prompt, "content"), (self.style_prompt, "style")):
            span = None if parsed is None else getattr(parsed, f"{role}_span")
            value = given or span or (parsed.clean if parsed else None)
            if value is None:
                raise UserInputError(
                    f"{NAME}: no calibration prompt for the {role} LoRA; give {role}_prompt (e.g. its trigger "
                    "prompt) or a prompt with <c>/<s> markers"
                )
            out.append(value)
        return out[0], out[1]


@dataclass
class _Layer:
    """Statistics of one routed layer: A (R, in[, kh, kw]) and B' (out, R) of both LoRAs, G and Q (R, R)."""

    layer: nn.Module
    down: Tensor
    up: Tensor
    blocks: tuple[slice, slice]  # rows of A (columns of B) that belong to content and to style
    gram: Tensor
    guide: Tensor
    tokens: int = 0

    def signals(self, x: Tensor) -> Tensor:
        """z = A x for every token of the layer input: (tokens, R)."""
        x = x.detach().float()
        if isinstance(self.layer, nn.Conv2d):
            z = F.conv2d(x, self.down, None, self.layer.stride, self.layer.padding, self.layer.dilation)
            return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B, R, h, w) -> (B·h·w, R)
        return F.linear(x, self.down).reshape(-1, self.down.shape[0])

    def accumulate(self, x: Tensor, task: int) -> None:
        z = self.signals(x).double()
        self.gram += z.T @ z
        own = self.blocks[task]
        self.guide[own] += z[:, own].T @ z
        self.tokens += z.shape[0]

    def router(self, ridge: float) -> Tensor:
        eye = torch.eye(self.gram.shape[0], dtype=torch.float64)
        # R (G/N + λI) = Q/N; G is symmetric, so solve (G/N + λI) Rᵀ = (Q/N)ᵀ
        return torch.linalg.solve(self.gram / self.tokens + ridge * eye, (self.guide / self.tokens).T).T


class _StopCalibration(Exception):
    """Raised by a step hook to end a calibration run after its first steps (the statistics need no more)."""


class _StopAfter:
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def before_step(self, step_index: int, num_steps: int, unet: nn.Module) -> None:
        if step_index >= self.steps:
            raise _StopCalibration

    def after_sampling(self, unet: nn.Module) -> None:
        pass


def _calibrate(pipe: Any, layers: dict[str, _Layer], state: LoraState, weight: float, task: int, prompt: str,
               config: SsrConfig) -> None:  # fmt: skip
    """Run the model with LoRA `task` alone on its prompt for the first calib_steps steps, adding every routed
    layer's inputs to the statistics. The base weights are restored afterwards."""
    from lorafuse.fusion.sampling import sample
    from lorafuse.lora.merge import fuse_into, unfuse

    handles = []
    for entry in layers.values():
        handles.append(entry.layer.register_forward_hook(
            lambda _m, args, _out, entry=entry: entry.accumulate(args[0], task)))  # fmt: skip
    try:
        if state.modules and weight != 0:
            fuse_into(pipe, state, weight)
        # the real sampling loop (same noise, scheduler and CFG as a fused run), stopped after calib_steps steps
        sample(pipe, prompt, steps=config.calib_schedule_steps, guidance=config.calib_guidance, seed=config.seed,
               hooks=[_StopAfter(config.calib_steps)], output="latent", progress=False)  # fmt: skip
    except _StopCalibration:
        pass
    finally:
        for handle in handles:
            handle.remove()
        unfuse(pipe)


def ssr_lora(pipe: Any, content: LoraState, style: LoraState, config: SsrConfig
             ) -> tuple[list[tuple[LoraState, float]], dict[str, Any]]:  # fmt: skip
    """[(routed LoRA, 1), (content rest, w_c), (style rest, w_s)]: fusing their sum is the merge; and a record.
    The pipe is unchanged afterwards."""
    comps = components_of(pipe)
    refs = [resolve(pipe, content), resolve(pipe, style)]
    weights = (config.content_weight, config.style_weight)
    by_ref: dict[ModuleRef, list[str | None]] = {}
    for task, targets in enumerate(refs):
        for key, ref in targets.items():
            by_ref.setdefault(ref, [None, None])[task] = key
    routed: dict[str, _Layer] = {}
    summed: list[list[str]] = [[], []]
    for ref, keys in by_ref.items():
        module = comps[ref.component].get_submodule(ref.path)
        layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        is_conv = isinstance(layer, nn.Conv2d)
        if None in keys or not is_denoiser(ref) or (is_conv and not config.route_convs) or (
                is_conv and layer.groups != 1) or 0 in weights:  # fmt: skip
            for task, key in enumerate(keys):
                if key is not None:
                    summed[task].append(key)
            continue
        (a_c, b_c), (a_s, b_s) = (  # B' flattened to (out, r): the router acts on its columns
            (a, b.flatten(1)) for a, b in (layer_factors(state.modules[key], layer, w)
                                           for state, key, w in zip((content, style), keys, weights, strict=True))
        )  # fmt: skip
        r_c, r = a_c.shape[0], a_c.shape[0] + a_s.shape[0]
        routed[keys[0]] = _Layer(
            layer=layer, down=torch.cat([a_c, a_s]), up=torch.cat([b_c, b_s], dim=1),
            blocks=(slice(0, r_c), slice(r_c, r)), gram=torch.zeros(r, r, dtype=torch.float64),
            guide=torch.zeros(r, r, dtype=torch.float64),
        )  # fmt: skip
    prompts = config.calibration_prompts() if routed else (None, None)  # nothing to calibrate at weight 0
    if routed:
        for task, (state, w) in enumerate(zip((content, style), weights, strict=True)):
            _calibrate(pipe, routed, state, w, task, prompts[task], config)
    modules: dict[str, LoraModule] = {}
    for key, entry in routed.items():
        if entry.tokens == 0:
            raise LorafuseError(f"{NAME}: layer {key} saw no activations during calibration")
        up = entry.up.double() @ entry.router(config.ridge)
        shape = (up.shape[0], up.shape[1], *([1, 1] if entry.down.dim() == 4 else []))
        modules[key] = LoraModule(down=entry.down.contiguous(), up=up.float().reshape(shape).contiguous(), alpha=None)
    merged = LoraState(modules=modules, source_path=f"{NAME} merge")
    merged.source_names.update({k: n for s in (content, style) for k, n in s.source_names.items() if k in modules})
    parts = [(merged, 1.0), (split_state(content, summed[0]), weights[0]), (split_state(style, summed[1]), weights[1])]
    record = {"routed_layers": len(routed), "summed_layers": len(set(summed[0]) | set(summed[1])),
              "calibration_prompts": list(prompts),
              "calibration_tokens": sum(e.tokens for e in routed.values())}  # fmt: skip
    return parts, record


@register
class SsrMerge(FusionMethod):
    name = NAME
    config_cls = SsrConfig
    paper_inputs = ("attn", {})  # the official hooks route nn.Linear only: Linear (attention) LoRAs
    summary = "SSR-Merge: closed-form routing of each LoRA's signal into its own subspace (calibrated, fused)"

    @staticmethod
    def prepare_prompt(prompt: Any, config: FusionConfig) -> tuple[Any, FusionConfig]:
        """(the clean prompt(s) for the text encoder, `config` with the marked prompt kept for calibration)."""
        parsed = common_markers([prompt] if isinstance(prompt, str) else list(prompt))
        config = dataclasses.replace(config, prompt=parsed.raw)
        return strip_markers(prompt), config

    def _build(self, plan: FusionPlan, pipe: Any, content: LoraState, style: LoraState, config: SsrConfig) -> None:
        parts, record = ssr_lora(pipe, content, style, config)
        plan.record.update(record)
        plan.record.update(fuse_sum(pipe, parts, plan.undo))
