"""The contract between fusion methods and the sampling loop, and a validating registry of methods.

A fusion method turns (base pipeline, content LoRA, style LoRA, typed options) into a `FusionPlan`: the
step hooks and guidance the shared `sample()` loop calls, plus an undo. The loop never asks which method
it runs (no `if method == ...`): everything method-specific lives in the plan.

    method = get_method("klora")
    cfg = method.config_cls(content_weight=1.0, style_weight=1.0)   # typed, validated options
    plan = method().plan(pipe, content_state, style_state, cfg)
    try:
        result = sample(pipe, prompt, guidance=plan.guidance(7.5), hooks=plan.hooks, ...)
    finally:
        plan.close()                                                   # base model restored exactly
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lorafuse.errors import UserInputError
from lorafuse.guidance.base import Guidance, StepHook
from lorafuse.guidance.cfg import ClassifierFreeGuidance
from lorafuse.lora.state import LoraState


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
        for name in ("content_weight", "style_weight"):
            value = getattr(self, name)
            if not -4.0 <= value <= 4.0:
                raise UserInputError(f"{method}: option {name}={value} is out of range [-4, 4]")


class FusionMethod(ABC):
    name: ClassVar[str]
    config_cls: ClassVar[type[FusionConfig]] = FusionConfig
    summary: ClassVar[str] = ""

    @staticmethod
    def prepare_prompt(prompt: Any, config: FusionConfig) -> tuple[Any, FusionConfig]:
        """(prompt for the text encoder, config) before planning. CRAFT reads `<c>`/`<s>` markers here."""
        return prompt, config

    @abstractmethod
    def plan(self, pipe: Any, content: LoraState, style: LoraState, config: FusionConfig) -> FusionPlan:
        """Prepare the pipeline (inject/fuse adapters) and return what the loop needs. Validate first."""


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


def make_config(method: str, **options: Any) -> FusionConfig:
    """Typed options from keyword arguments; unknown options are errors naming the method and the option."""
    cls = get_method(method).config_cls
    allowed = set(cls.__dataclass_fields__)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UserInputError(f"{method}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    cfg = cls(**options)
    cfg.validate(method)
    return cfg


# Built-in methods register themselves on import; the list is the order `--method all` shows them in.
BUILTIN_MODULES = ("direct", "klora", "switch", "composite", "blora", "ziplora", "nplora", "craft", "ssr_merge")


def _load_builtin_methods() -> None:
    import importlib

    for mod in BUILTIN_MODULES:
        try:
            importlib.import_module(f"lorafuse.fusion.{mod}")
        except ModuleNotFoundError as exc:  # a method not written yet must not break the others
            if exc.name != f"lorafuse.fusion.{mod}":
                raise
