"""The contract between fusion methods and the sampling loop, and a validating registry of methods.

A fusion method turns (base pipeline, content LoRA, style LoRA, typed options) into a `FusionPlan`: the
step hooks and guidance the shared `sample()` loop calls, plus an undo. The loop never asks which method
it runs (no `if method == ...`): everything method-specific lives in the plan, and what callers outside the
loop need to know (does the method read prompt markers, does it want reference images, which layers its
LoRAs should cover) is declared on the method class.

    method = get_method("klora")
    cfg = make_config("klora", None, selection="random")              # typed, validated options
    plan = method().plan(pipe, content_state, style_state, cfg)
    try:
        result = sample(pipe, prompt, guidance=plan.guidance(7.5), hooks=plan.hooks, ...)
    finally:
        plan.close()                                                   # base model restored exactly

Adding a method: subclass `FusionConfig` for its options and `FusionMethod` for its `_build`, decorate the class
with `@register`, and add its module to `BUILTIN_MODULES` (`direct.py` is the shortest example).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lorafuse.config.toml_io import load_config
from lorafuse.errors import ConfigError, UserInputError
from lorafuse.families import family_of
from lorafuse.fusion.common import check_finite, require_clean_base, resolve
from lorafuse.fusion.markers import strip_markers
from lorafuse.guidance.base import Guidance, StepHook
from lorafuse.guidance.cfg import ClassifierFreeGuidance
from lorafuse.lora.state import LoraState


def check_range(method: str, name: str, value: float, lo: float, hi: float, *, integer: bool = False) -> None:
    """`value` is a finite number (an integer if asked) in [lo, hi]; the error names the method and option."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        what = "an integer" if integer else "a finite number"
        raise UserInputError(f"{method}: option {name} must be {what}, got {value!r}")
    if not lo <= value <= hi:
        raise UserInputError(f"{method}: option {name}={value} is out of range [{lo}, {hi}]")


def check_choice(method: str, name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserInputError(f"{method}: option {name}={value!r}; choose from {', '.join(choices)}")


@dataclass
class FusionPlan:
    hooks: list[StepHook] = field(default_factory=list)
    # guidance scale -> the Guidance object the loop calls (plain CFG unless the method needs more)
    guidance: Callable[[float], Guidance] = ClassifierFreeGuidance
    record: dict[str, Any] = field(default_factory=dict)  # settings and diagnostics for the JSON record
    undo: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        """Undo in reverse order (remove adapters, unfuse weights). Safe to call twice."""
        while self.undo:
            self.undo.pop()()


@dataclass
class FusionConfig:
    """Options every method shares. Methods subclass it with their own fields and checks."""

    content_weight: float = 1.0
    style_weight: float = 1.0

    def validate(self, method: str) -> None:
        # the one place weights are checked: NaN and inf are refused as non-finite before the range test
        for name in ("content_weight", "style_weight"):
            check_range(method, name, getattr(self, name), -4, 4)

    def record(self) -> dict[str, Any]:
        """JSON-ready options: plain values as they are, paths as strings, anything else (an image, a tensor,
        loaded mergers) by its type name only."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or isinstance(value, bool | int | float | str):
                out[f.name] = value
            elif isinstance(value, os.PathLike):
                out[f.name] = os.fspath(value)
            elif isinstance(value, list | tuple) and all(isinstance(v, bool | int | float | str) for v in value):
                out[f.name] = list(value)
            else:
                out[f.name] = f"<{type(value).__name__}>"
        return out


class FusionMethod(ABC):
    """A fusion method. `plan()` is the same for all: check inputs, then `_build`; on any error in `_build`, the
    undo steps it registered run, so the base model is left exactly as it was."""

    name: ClassVar[str]
    config_cls: ClassVar[type[FusionConfig]] = FusionConfig
    summary: ClassVar[str] = ""
    # what callers ask instead of branching on the method's name:
    # options content_image / content_prompt / style_image / style_prompt are references the method learns from
    needs_references: ClassVar[bool] = False
    # the input set a comparison gives it by default: "locon" (any LoRA; the common all-layer LoCon pair users
    # have) or "craft" (LoRAs trained on disjoint content/style layer sets, without which it cannot run)
    lora_layers: ClassVar[str] = "locon"
    # the inputs its paper prescribes, for the fair rows of a leaderboard: the input set its LoRAs are trained on
    # ("locon"; "attn" = attention projections only; "blora" = one LoRA on B-LoRA's two blocks, trained jointly;
    # "craft") and the options its official code runs with
    paper_inputs: ClassVar[tuple[str, Mapping[str, Any]]] = ("locon", {})

    @staticmethod
    def prepare_prompt(prompt: Any, config: FusionConfig) -> tuple[Any, FusionConfig]:
        """(prompt for the text encoder, config) before planning. Every method accepts `<c>`/`<s>` markers and
        drops them here; a method that reads them (CRAFT) overrides this."""
        return strip_markers(prompt), config

    def plan(self, pipe: Any, content: LoraState, style: LoraState, config: FusionConfig) -> FusionPlan:
        """Prepare the pipeline (inject/fuse adapters) and return what the loop needs."""
        # 1. Check inputs, before anything changes
        self.check_inputs(pipe, content, style, config)
        # 2. Build; an error undoes every step registered so far, in reverse
        plan = FusionPlan(record={"method": self.name, "settings": config.record()})
        with contextlib.ExitStack() as on_error:
            on_error.callback(plan.close)
            self._build(plan, pipe, content, style, config)
            on_error.pop_all()
        return plan

    def check_inputs(self, pipe: Any, content: LoraState, style: LoraState, config: FusionConfig) -> None:
        """The checks every plan makes first: option types and ranges, a clean base, finite LoRAs whose keys
        and shapes fit this base. One place, so every method refuses bad input with the same words."""
        family_of(pipe).check_refused(self.name)  # a method a family cannot run (B-LoRA on FLUX.1) says so first
        if not isinstance(config, self.config_cls):
            raise UserInputError(f"{self.name}: expected a {self.config_cls.__name__}, got {type(config).__name__}")
        config.validate(self.name)
        require_clean_base(pipe, self.name)
        for state, role in ((content, "content"), (style, "style")):
            check_finite(state, role)
            resolve(pipe, state)  # wrong-base and shape errors name the file

    @abstractmethod
    def _build(self, plan: FusionPlan, pipe: Any, content: LoraState, style: LoraState, config: Any) -> None:
        """Fill `plan` (hooks, guidance, record); append an undo step right before each change to `pipe`."""


METHODS: dict[str, type[FusionMethod]] = {}


def register(cls: type[FusionMethod]) -> type[FusionMethod]:
    """Class decorator. Refuses duplicate names and methods without a name or config class."""
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls.__name__} has no `name`")
    if name in METHODS and METHODS[name] is not cls:
        raise TypeError(f"fusion method {name!r} registered twice ({METHODS[name].__name__}, {cls.__name__})")
    if not (isinstance(cls.config_cls, type) and issubclass(cls.config_cls, FusionConfig)):
        raise TypeError(f"{cls.__name__}.config_cls must subclass FusionConfig")
    METHODS[name] = cls
    return cls


def get_method(name: str) -> type[FusionMethod]:
    _load_builtin_methods()
    if name not in METHODS:
        raise UserInputError(f"unknown fusion method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_names() -> list[str]:
    _load_builtin_methods()
    return list(METHODS)


def make_config(method: str, config: FusionConfig | str | os.PathLike | None = None, /, **options: Any
                ) -> FusionConfig:  # fmt: skip
    """The typed, validated options of `method`: defaults, then `config` (a config object or a TOML file), then
    `options` (values, or strings from the command line such as "0.5" or "random"). Unknown keys and values out
    of range are errors naming the method, the file and the option."""
    cls = get_method(method).config_cls
    if isinstance(config, FusionConfig):
        # a config object may hold values TOML cannot (an image, loaded mergers): replace, no round trip
        if not isinstance(config, cls):
            raise UserInputError(f"{method}: expected a {cls.__name__}, got a {type(config).__name__}")
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"{method}: unknown option(s) {', '.join(map(repr, unknown))}; allowed: "
                              f"{', '.join(sorted(cls.__dataclass_fields__))}")  # fmt: skip
        cfg = dataclasses.replace(config, **options)
    else:
        try:
            cfg = load_config(cls, None if config is None else Path(config), overrides=options or None)
        except ConfigError as e:
            raise ConfigError(f"{method}: {e}") from None
    cfg.validate(method)
    return cfg


# Built-in methods register themselves on import; the list is the order `--method all` shows them in.
BUILTIN_MODULES = ("direct", "klora", "switch", "composite", "blora", "ziplora", "nplora", "craft", "ssr_merge")


def _load_builtin_methods() -> None:
    # every name here must import: a typo or a broken method is an error, not a method silently missing
    for mod in BUILTIN_MODULES:
        importlib.import_module(f"lorafuse.fusion.{mod}")
