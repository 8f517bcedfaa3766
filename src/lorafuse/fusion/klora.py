"""K-LoRA (Ouyang et al., CVPR 2025; docs/algorithms.md §2): per attention projection and step, the content OR the style update.

Notation map: `delta_c` / `delta_s` are ΔW_c,l / ΔW_s,l; `k` is K_l = r_c r_s; `top_c` / `top_s` are S_c,l / S_s,l
(Σ of the K largest |ΔW| entries); `gamma` is γ; `alpha`, `beta` give S(i) = α i/T + β. Layer l uses the content
update at step i iff S_c,l ≥ γ S(i) S_s,l (`klora_schedule.schedule_table`).

How it runs. Everything but S(i) is step-independent, so `plan()` computes the scores once and the (layer x step)
table is built once per step count; at run time a `StepHook` looks each layer's choice up and switches it with
the mechanism of `fusion.variants` ("swap": precomputed W + w ΔW per layer, a pointer assignment per switch,
base-model speed; "adapter": peft adapters, less memory; "inplace": the layer's own tensor rewritten, original
on the CPU, for real-size FLUX.1; "auto", the default, picks swap or inplace from the free memory). Under the paper's rule each layer switches at most
once per image (S(i) rises), so a run costs at most 2 pointer assignments per layer.

Modules outside the attention projections (resnet convs, feed-forwards, text encoders), which the paper does not
choose between: `non_attention="sum"` fuses w_c ΔW_c + w_s ΔW_s there (exact, as `direct`), "ignore" leaves
them out (what the official code does, since it only loads attention weights), "auto" is "sum" for the paper
rule and "ignore" for `klora_mode="official"`. Prompts are encoded once before step 0, so the text-encoder
part acts as that sum throughout.

Weights: the scores use the unweighted ΔW (γ would cancel any weighting anyway); the chosen update is applied
at its weight, `W + w_c ΔW_c` or `W + w_s ΔW_s`.

`klora_mode="official"` reproduces HVision-NKU/K-LoRA (docs/algorithms.md §2.1): ΔW = up @ down without alpha / r (scores and the
applied update), γ the trimmed mean of per-layer ratios, time = a call counter over every K-LoRA projection's
forward, u = (count mod P)/P with P = `official_period` (0: layers x steps, which is the official 28000 for SDXL
at 50 steps), S = (α u + β) mod α with β = 0.85 α by default, content iff S_c / (γ S S_s) > 1 strictly. The
counter lives as long as the plan (the official one is never reset). Ablations: `selection="fixed"` and
`selection="random"` (paper rule only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch

from lorafuse.errors import UserInputError
from lorafuse.fusion.common import (
    forward_order,
    fuse_sum,
    is_attention_projection,
    lora_label,
    raw_delta,
    resolve,
    split_state,
)
from lorafuse.fusion.klora_schedule import (
    LayerScores,
    gamma_official,
    gamma_paper,
    layer_scores,
    official_choice,
    official_scale,
    official_table,
    schedule_table,
)
from lorafuse.fusion.registry import FusionConfig, FusionMethod, FusionPlan, register
from lorafuse.fusion.variants import BASE, MECHANISMS, LayerVariants, make_variants
from lorafuse.lora.state import LoraState
from lorafuse.lora.targets import ModuleRef, components_of

CONTENT, STYLE = 0, 1
ADAPTER_NAMES = ("klora_content", "klora_style")


@dataclass
class KLoraConfig(FusionConfig):
    """K-LoRA options; defaults are the paper's (α = 1.5, β = 0.5, K = r_c r_s, Top-K selection)."""

    klora_mode: Literal["paper", "official"] = "paper"
    selection: Literal["topk", "fixed", "random"] = "topk"
    alpha: float = 1.5
    beta: float | None = None  # None: 0.5 (paper), 0.85 · alpha (official "s*" pattern)
    k: int = 0  # 0: K_l = r_c · r_s per layer; > 0: this K everywhere (the paper's Figure 8 ablation)
    random_p: float = 1 / 3  # selection="random": probability of the content LoRA
    random_seed: int = 0
    official_period: int = 0  # official counter period P; 0: K-LoRA layers x steps of the first image
    non_attention: Literal["auto", "sum", "ignore"] = "auto"
    mechanism: Literal["auto", "swap", "adapter", "inplace"] = "auto"

    def validate(self, method: str) -> None:
        super().validate(method)
        checks = [
            ("klora_mode", self.klora_mode in ("paper", "official"), "'paper' or 'official'"),
            ("selection", self.selection in ("topk", "fixed", "random"), "'topk', 'fixed' or 'random'"),
            ("alpha", math.isfinite(self.alpha) and self.alpha > 0, "a finite number > 0"),
            ("beta", self.beta is None or math.isfinite(self.beta), "a finite number (or unset)"),
            ("k", isinstance(self.k, int) and self.k >= 0, "an integer >= 0 (0 = r_c · r_s)"),
            ("random_p", 0.0 <= self.random_p <= 1.0, "in [0, 1]"),
            ("official_period", isinstance(self.official_period, int) and self.official_period >= 0, ">= 0"),
            ("non_attention", self.non_attention in ("auto", "sum", "ignore"), "'auto', 'sum' or 'ignore'"),
            ("mechanism", self.mechanism in MECHANISMS, "'auto', 'swap', 'adapter' or 'inplace'"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise UserInputError(f"{method}: option {name}={getattr(self, name)!r} must be {expected}")
        if self.klora_mode == "official" and self.selection != "topk":
            raise UserInputError(
                f"{method}: option selection={self.selection!r} is an ablation of the paper rule; "
                "use it with klora_mode='paper'"
            )

    def resolved_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        return 0.85 * self.alpha if self.klora_mode == "official" else 0.5


class KLoraHook:
    """Paper rule: before step i, layer l takes the content update iff table[l, i] (built once per T)."""

    def __init__(self, variants: LayerVariants, scores: LayerScores, gamma: float, config: KLoraConfig,
                 record: dict[str, Any]) -> None:  # fmt: skip
        self.variants, self.scores, self.gamma = variants, scores, gamma
        self.config, self.record = config, record
        self._tables: dict[int, torch.Tensor] = {}

    def table(self, num_steps: int) -> torch.Tensor:
        """(L, T) bool, True = content; computed once per step count."""
        if num_steps not in self._tables:
            c = self.config
            self._tables[num_steps] = schedule_table(
                self.scores, num_steps, gamma=self.gamma, alpha=c.alpha, beta=c.resolved_beta(),
                selection=c.selection, random_p=c.random_p, seed=c.random_seed,
            )  # fmt: skip
        return self._tables[num_steps]

    def before_step(self, step_index: int, num_steps: int, unet: torch.nn.Module) -> None:
        table = self.table(num_steps)
        if step_index == 0:
            self.record["schedule"] = schedule_record(self.scores, table)
        for layer, content in enumerate(table[:, step_index].tolist()):
            self.variants.select(layer, CONTENT if content else STYLE)

    def after_sampling(self, unet: torch.nn.Module) -> None:
        self.variants.select_all(BASE)

    def __repr__(self) -> str:
        return f"KLoraHook(layers={len(self.scores)}, gamma={self.gamma:.4g}, selection={self.config.selection!r})"


class KLoraOfficialHook:
    """Official rule: a forward pre-hook on every K-LoRA projection counts the call and chooses for that call."""

    def __init__(self, variants: LayerVariants, modules: list[torch.nn.Module], scores: LayerScores,
                 gamma: float, config: KLoraConfig, record: dict[str, Any]) -> None:  # fmt: skip
        self.variants, self.modules, self.scores, self.record = variants, modules, scores, record
        self.gamma, self.alpha, self.beta = gamma, config.alpha, config.resolved_beta()
        self.period = config.official_period
        self.count = 0  # never reset, as the official global counter
        self._content_score = [c / gamma for c in scores.top_c]  # S_c / γ, the official order of operations
        self._handles: list[Any] = []

    def _choose(self, layer: int, module: torch.nn.Module, args: tuple) -> None:
        self.count += 1
        scale = official_scale(self.count, self.period, self.alpha, self.beta)
        content = official_choice(self._content_score[layer], self.scores.top_s[layer], scale)
        self.variants.select(layer, CONTENT if content else STYLE)

    def before_step(self, step_index: int, num_steps: int, unet: torch.nn.Module) -> None:
        if self._handles:
            return
        if self.period == 0:
            self.period = len(self.scores) * num_steps
        table = official_table(self.scores, num_steps, gamma=self.gamma, alpha=self.alpha, beta=self.beta,
                               period=self.period, start=self.count)  # fmt: skip
        self.record["schedule"] = schedule_record(self.scores, table)
        self.record["official_period"] = self.period
        self._handles = [
            m.register_forward_pre_hook(partial(self._choose, i)) for i, m in enumerate(self.modules)
        ]

    def after_sampling(self, unet: torch.nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.variants.select_all(BASE)
        self.record["official_calls"] = self.count

    def __repr__(self) -> str:
        return f"KLoraOfficialHook(layers={len(self.scores)}, gamma={self.gamma:.4g}, period={self.period})"


def schedule_record(scores: LayerScores, table: torch.Tensor) -> dict[str, Any]:
    """JSON-ready: {"num_steps", "layers", "content": L rows of T 0/1 (1 = content)}."""
    return {
        "num_steps": int(table.shape[1]),
        "layers": scores.layers,
        "content": table.to(torch.uint8).tolist(),
    }


def _by_ref(refs: dict[str, ModuleRef]) -> dict[ModuleRef, str]:
    return {ref: key for key, ref in refs.items()}


@register
class KLora(FusionMethod):
    name = "klora"
    config_cls = KLoraConfig
    # the paper fuses attention-only DreamBooth LoRAs; the official code loads nothing outside attention
    paper_inputs = ("attn", {"non_attention": "ignore"})
    summary = "K-LoRA: per attention layer and step, content or style by Top-K sums and a rising scale"

    def _build(self, plan: FusionPlan, pipe: Any, content: LoraState, style: LoraState, config: KLoraConfig) -> None:
        official = config.klora_mode == "official"
        refs_c, refs_s = resolve(pipe, content), resolve(pipe, style)
        attn_c = {k: r for k, r in refs_c.items() if is_attention_projection(r)}
        attn_s = {k: r for k, r in refs_s.items() if is_attention_projection(r)}
        for state, attn, role in ((content, attn_c, "content"), (style, attn_s, "style")):
            if not attn:
                raise UserInputError(
                    f"{self.name}: {lora_label(state, role)} has no LoRA on attention projections "
                    "(to_q, to_k, to_v, to_out.0), which K-LoRA chooses between; use method 'direct'"
                )
        layers = forward_order(pipe, set(attn_c.values()) | set(attn_s.values()))
        scores = self._scores(layers, content, style, attn_c, attn_s, config, scaled=not official)
        gamma = self._gamma(scores, content, style, official)
        mode = config.non_attention if config.non_attention != "auto" else ("ignore" if official else "sum")
        plan.record.update({
            "klora_mode": config.klora_mode, "selection": config.selection,
            "alpha": config.alpha, "beta": config.resolved_beta(), "gamma": gamma, "layers": scores.layers,
            "k": scores.k, "top_c": scores.top_c, "top_s": scores.top_s, "mechanism": config.mechanism,
            "content_weight": config.content_weight, "style_weight": config.style_weight, "non_attention": mode,
        })  # fmt: skip
        if mode == "sum":
            others_c = split_state(content, set(refs_c) - set(attn_c))
            others_s = split_state(style, set(refs_s) - set(attn_s))
            parts = [(others_c, config.content_weight), (others_s, config.style_weight)]
            plan.record.update(fuse_sum(pipe, parts, plan.undo))
        variants = make_variants(
            config.mechanism, pipe, layers,
            [(content, attn_c, config.content_weight), (style, attn_s, config.style_weight)],
            ADAPTER_NAMES, scaled=not official,
        )  # fmt: skip
        plan.undo.append(variants.close)
        plan.record["mechanism"] = variants.mechanism  # "auto" resolved
        if official:
            modules = [components_of(pipe)[r.component].get_submodule(r.path) for r in layers]
            hook: Any = KLoraOfficialHook(variants, modules, scores, gamma, config, plan.record)
        else:
            hook = KLoraHook(variants, scores, gamma, config, plan.record)
        plan.hooks.append(hook)

    @staticmethod
    def _scores(layers, content, style, attn_c, attn_s, config: KLoraConfig, *, scaled: bool) -> LayerScores:
        key_c, key_s = _by_ref(attn_c), _by_ref(attn_s)
        deltas_c, deltas_s, ranks_c, ranks_s = [], [], [], []
        for ref in layers:
            for state, keys, deltas, ranks in (
                (content, key_c, deltas_c, ranks_c),
                (style, key_s, deltas_s, ranks_s),
            ):
                module = state.modules[keys[ref]] if ref in keys else None
                deltas.append(None if module is None else raw_delta(module, ref.shape, scaled))
                ranks.append(None if module is None else module.rank)
        names = [f"{r.component}.{r.path}" for r in layers]
        return layer_scores(names, deltas_c, deltas_s, ranks_c, ranks_s, fixed_k=config.k)

    def _gamma(self, scores: LayerScores, content: LoraState, style: LoraState, official: bool) -> float:
        for state, sums, role in ((content, scores.abs_c, "content"), (style, scores.abs_s, "style")):
            if sum(sums) == 0:
                raise UserInputError(
                    f"{self.name}: {lora_label(state, role)} has only zero updates on attention projections; "
                    "the balance factor γ = Σ|ΔW_c| / Σ|ΔW_s| is undefined"
                )
        if not official:
            return gamma_paper(scores)
        try:
            gamma = gamma_official(scores)
        except ValueError:
            raise UserInputError(
                f"{self.name}: klora_mode='official' needs attention layers that both LoRAs update "
                f"({lora_label(content, 'content')} and {lora_label(style, 'style')} share none)"
            ) from None
        if not 0 < gamma < math.inf:
            raise UserInputError(f"{self.name}: the official balance factor γ = {gamma} is unusable")
        return gamma
