"""`lorafuse.fuse`: one call from two LoRA files to images, with any registered fusion method.

    result = lorafuse.fuse(content="dog.safetensors", style="watercolor.safetensors", method="klora",
                           prompt="a sks dog in watercolor style", base="world", steps=25, seed=0)
    result.images          # (N, H, W, 3) floats in [0, 1]
    result.record          # JSON-ready: method, typed options, LoRAs, sampling settings, plan diagnostics, timings

Everything that can be wrong is checked before any sampling, in this order, each error naming the method and the
file or option: the method and its options (typed config, TOML file and keyword overrides), the base model,
the sampling arguments, then each LoRA (readable, finite, keys and shapes fitting this base: two LoRAs made for
different bases fail on the one that does not fit). The base pipeline is restored exactly afterwards, also
after an error (`FusionPlan.close`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorafuse.errors import UserInputError
from lorafuse.families import family_of
from lorafuse.fusion.common import check_finite, lora_label, require_clean_base
from lorafuse.fusion.registry import FusionConfig, get_method, make_config
from lorafuse.lora.state import LoraState
from lorafuse.utils.images import to_uint8

LoraInput = str | os.PathLike | LoraState


@dataclass(frozen=True)
class FuseResult:
    """images: (N, H, W, 3) float32 in [0, 1], prompt-major (image k from seed + k). record: JSON-ready."""

    images: np.ndarray
    record: dict[str, Any]

    def uint8(self) -> np.ndarray:
        return to_uint8(self.images)


def load_base(base: Any, *, device: str | None = None, dtype: str | None = None) -> Any:
    """A pipeline as is; a name or path through `models.load.load_base_pipeline` (nothing downloads), its
    weights moved to `device` and cast to `dtype` ("cuda", "bf16", ...) when given."""
    if not isinstance(base, str | os.PathLike):
        if device is not None or dtype is not None:
            raise UserInputError("device and dtype apply to a base given by name or path; move a pipeline "
                                 "yourself (pipe.to(device, dtype)) before passing it")  # fmt: skip
        try:
            family_of(base)
        except UserInputError:
            raise UserInputError(
                f"base must be a diffusers pipeline, a folder, a file or a name; got {base!r}"
            ) from None
        return base
    from lorafuse.models.load import load_base_pipeline

    return load_base_pipeline(os.fspath(base), device=device, dtype=dtype)


def precheck_pair(content: LoraInput, style: LoraInput, method: str, *, allow_pickle: bool = False) -> None:
    """The file-level checks of both LoRA files (no base needed), named by role as `load_pair` names them."""
    from lorafuse.lora.io import check_lora_file

    for given, role in ((content, "content"), (style, "style")):
        if isinstance(given, str | os.PathLike):
            try:
                check_lora_file(given, allow_pickle=allow_pickle)
            except UserInputError as e:
                raise type(e)(f"{method}: {role} LoRA: {e}") from None


def load_pair(pipe: Any, content: LoraInput, style: LoraInput, method: str, *, allow_pickle: bool = False
              ) -> tuple[LoraState, LoraState, list[str]]:  # fmt: skip
    """Read and check both LoRAs against `pipe`; returns them and the coverage warnings."""
    from lorafuse.lora.io import load_lora
    from lorafuse.lora.validate import validate_lora

    arch = family_of(pipe).name
    states, warnings = [], []
    for given, role in ((content, "content"), (style, "style")):
        try:
            if isinstance(given, LoraState):
                state = given
            elif isinstance(given, str | os.PathLike):
                state = load_lora(given, allow_pickle=allow_pickle, base=pipe)
            else:
                raise UserInputError(
                    f"{role} must be a LoRA file path or a LoraState, got {type(given).__name__}"
                )
            check_finite(state, role)
            report = validate_lora(state, pipe, arch=arch)
        except UserInputError as e:
            raise type(e)(f"{method}: {role} LoRA: {e}") from None
        warnings += report.warnings
        states.append(state)
    return states[0], states[1], warnings


def describe(state: LoraState, role: str) -> dict[str, Any]:
    ranks = sorted({m.rank for m in state.modules.values()})
    return {
        "role": role, "source": lora_label(state, role), "format": state.source_format,
        "modules": len(state.modules), "components": sorted(state.components()), "ranks": ranks,
    }  # fmt: skip


def fuse(
    content: LoraInput,
    style: LoraInput,
    *,
    prompt: str | Sequence[str],
    method: str = "klora",
    base: Any = "world",
    negative_prompt: str | Sequence[str] | None = None,
    num_images: int = 1,
    steps: int = 25,
    guidance: float | None = None,
    seed: int = 0,
    scheduler: str | None = "default",
    height: int | None = None,
    width: int | None = None,
    config: FusionConfig | str | os.PathLike | None = None,
    progress: bool = True,
    allow_pickle: bool = False,
    **method_options: Any,
) -> FuseResult:
    """Fuse a content and a style LoRA with `method` and sample images (see the module docstring).

    content, style: LoRA files (.safetensors) or `LoraState`s. base: "world" (the built-in model), another name
    of `models.load.BUILTIN_BASES`, a diffusers folder or checkpoint, or a pipeline (restored afterwards).
    config: the method's typed config or a TOML file of its options; `method_options` override single options
    (content_weight, style_weight, and each method's own, e.g. klora's selection="random").
    seed: image k starts from noise seeded `seed + k`, so every method sees the same noise for the same seed.
    """
    from lorafuse import __version__
    from lorafuse.fusion.sampling import check_counts, check_inputs, sample

    # 1. Check inputs, before any compute: method and options, base, sampling arguments, LoRAs
    fusion = get_method(method)
    cfg = make_config(method, config, **method_options)
    # every method drops `<c>`/`<s>` markers before the text encoder; CRAFT also reads them for its λ
    prompt, cfg = fusion.prepare_prompt(prompt, cfg)
    try:
        check_counts(num_images, steps, seed)
    except UserInputError as e:
        raise UserInputError(f"{method}: {e}") from None
    precheck_pair(content, style, method, allow_pickle=allow_pickle)  # a broken file fails before the base loads
    pipe = load_base(base)
    family = family_of(pipe)
    family.check_refused(method)
    height = family.sample_size(pipe) if height is None else height
    width = family.sample_size(pipe) if width is None else width
    scheduler = family.default_scheduler if scheduler == "default" else scheduler
    guidance = family.default_guidance if guidance is None else guidance
    try:
        check_inputs(pipe, prompt, negative_prompt, num_images, steps, guidance, scheduler, height, width,
                     None, "diffusers", None, (), "np")  # fmt: skip
    except UserInputError as e:
        raise UserInputError(f"{method}: {e}") from None
    require_clean_base(pipe, method)
    content_state, style_state, warnings = load_pair(pipe, content, style, method, allow_pickle=allow_pickle)

    # 2. Plan (inject / fuse / precompute), sample, always restore the base
    t0 = time.perf_counter()
    plan = fusion().plan(pipe, content_state, style_state, cfg)
    try:
        t1 = time.perf_counter()
        result = sample(
            pipe, prompt, negative_prompt=negative_prompt, num_images=num_images, steps=steps,
            guidance=plan.guidance(float(guidance)), seed=seed, scheduler=scheduler, height=height, width=width,
            hooks=plan.hooks, output="np", progress=progress,
        )  # fmt: skip
        t2 = time.perf_counter()
    finally:
        plan.close()

    record = {
        "lorafuse": __version__,
        "method": method,
        "summary": fusion.summary,
        "options": cfg.record(),
        "base": os.fspath(base) if isinstance(base, str | os.PathLike) else type(pipe).__name__,
        "loras": [describe(content_state, "content"), describe(style_state, "style")],
        "coverage_warnings": warnings,
        "sampling": result.settings,
        "plan": plan.record,
        "timings_s": {"plan": round(t1 - t0, 4), "sample": round(t2 - t1, 4)},
    }
    return FuseResult(np.asarray(result.images, dtype=np.float32), record)
