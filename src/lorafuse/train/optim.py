"""Optimisers and learning-rate schedules by kohya's names, on maintained implementations.

AdamW: torch. AdamW8bit, PagedAdamW8bit, Lion, Lion8bit: bitsandbytes. Adafactor: transformers. Prodigy:
prodigyopt. Schedules: diffusers'
`get_scheduler` (constant, constant_with_warmup, linear, cosine, cosine_with_restarts with hard restarts,
polynomial). Warm-up is given as steps, or as a ratio of the total when < 1 (kohya accepts both).

`optimizer.optimizer_args` (kohya's `optimizer_args`) passes further constructor arguments, checked against the
real class's signature before any model loads: unknown names, values of the wrong kind, and arguments lorafuse
sets from its own fields are one error each, naming the argument.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lorafuse.errors import UserInputError
from lorafuse.utils.extras import require

OPTIMIZERS = ("AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion", "Lion8bit", "Adafactor", "Prodigy")
# kohya's bitsandbytes optimizer_types. kohya's "Lion" is lion-pytorch's class; bitsandbytes' 32-bit Lion makes the
# same update (Chen et al. 2023, Algorithm 2: sign of the interpolated momentum, decoupled weight decay) and is
# already a dependency, so it stands in (tests/train/test_optimizer_args.py checks it against the paper's rule).
BNB_OPTIMIZERS = ("AdamW8bit", "PagedAdamW8bit", "Lion", "Lion8bit")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")

# Constructor arguments lorafuse fills from its own fields. An optimizer argument of the same name is refused, not
# mapped: one setting has one place, and the resume check, the ss_* metadata and `--estimate` read the fields.
# (A kohya import maps weight_decay= and betas= to the fields, where the row says so.)
OWN_ARGS = {
    "params": "the LoRA's parameter groups are passed by lorafuse",
    "lr": "set optimizer.learning_rate (or unet_lr / text_encoder_lr); kohya passes it as lr too",
    "weight_decay": "set optimizer.weight_decay",
    "betas": "set optimizer.betas",
    "args": "bitsandbytes' internal config object, not a setting",
}
# Arguments lorafuse holds at one value: (value, why). Only that value is accepted.
FIXED_ARGS: dict[str, dict[str, tuple[Any, str]]] = {
    "Adafactor": {
        "relative_step": (False, "relative_step replaces the LR by Adafactor's own schedule; lorafuse's "
                          "lr_scheduler stays in charge (kohya's recommended Adafactor recipe)"),
        "warmup_init": (False, "it works only with relative_step"),
    },
}  # fmt: skip
# The classes' own weight_decay / betas where they differ from OptimizerConfig's defaults (0.01, (0.9, 0.999)):
# kohya passes neither unless optimizer_args does, so a kohya import sets these (a test checks the signatures).
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "Adafactor": {"weight_decay": 0.0},
    "Prodigy": {"weight_decay": 0.0},
    "Lion": {"weight_decay": 0.0, "betas": (0.9, 0.99)},
    "Lion8bit": {"weight_decay": 0.0, "betas": (0.9, 0.99)},
}
# lorafuse's defaults where they differ from the class's; an optimizer argument overrides them.
DEFAULT_ARGS: dict[str, dict[str, Any]] = {"Adafactor": {"scale_parameter": False}}


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class behind a kohya optimizer_type; a missing optional package is one error naming its extra."""
    if name == "AdamW":
        return torch.optim.AdamW
    if name in BNB_OPTIMIZERS:
        return getattr(require("bitsandbytes", f"optimizer_type {name}").optim, name)
    if name == "Adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    if name == "Prodigy":
        return require("prodigyopt", "optimizer_type Prodigy").Prodigy
    raise UserInputError(f"unknown optimizer_type {name!r}; allowed: {', '.join(OPTIMIZERS)}")


def settable_args(name: str) -> dict[str, Any]:
    """{argument: the class's default} of what optimizer_args may set for optimizer `name`."""
    params = inspect.signature(optimizer_class(name)).parameters
    return {
        k: p.default
        for k, p in params.items()
        if k not in OWN_ARGS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _converted(value: Any, default: Any) -> Any:
    """`value` as the kind of the class's default (what its code expects), or ValueError saying what was expected.
    kohya hands its literal_eval'd values over unchecked; a string "2" for d_coef would only fail mid-step."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ValueError("expected True or False")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError("expected an integer")
    if isinstance(default, float):
        if _number(value):
            return float(value)
        raise ValueError("expected a number")
    if isinstance(default, tuple):
        if isinstance(value, (list, tuple)) and len(value) == len(default) and all(map(_number, value)):
            return tuple(float(v) for v in value)
        raise ValueError(f"expected {len(default)} numbers such as {','.join(map(str, default))}")
    # no default, or None (Adafactor's beta1, torch's foreach): the class's own code decides
    return tuple(value) if isinstance(value, list) else value


def arg_problem(name: str, key: str, value: Any) -> str | None:
    """Why optimizer `name` cannot take `key=value` from optimizer_args, or None when it can."""
    if key in OWN_ARGS:
        return OWN_ARGS[key]
    fixed = FIXED_ARGS.get(name, {}).get(key)
    if fixed is not None and value != fixed[0]:
        return f"lorafuse runs {name} with {key}={fixed[0]}: {fixed[1]}"
    allowed = settable_args(name)
    if key not in allowed:
        return f"not an argument of {name}; valid: {', '.join(sorted(allowed))}"
    try:
        _converted(value, allowed[key])
    except ValueError as e:
        return f"{e} ({name}'s default is {allowed[key]!r}), got {value!r}"
    return None


def checked_optimizer_args(name: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """optimizer_args as the class takes them (tuples, floats); every bad argument named in one UserInputError."""
    problems = [f"{k}={v!r}: {why}" for k, v in args.items() if (why := arg_problem(name, k, v)) is not None]
    if problems:
        raise UserInputError(f"optimizer_args for {name}: " + "; ".join(problems))
    allowed = settable_args(name)
    return {k: _converted(v, allowed[k]) for k, v in args.items()}


def make_optimizer(
    name: str,
    param_groups: Iterable[dict],
    lr: float,
    weight_decay: float = 1e-2,
    betas: tuple[float, float] = (0.9, 0.999),
    optimizer_args: Mapping[str, Any] | None = None,
) -> torch.optim.Optimizer:
    cls = optimizer_class(name)
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if "betas" in inspect.signature(cls).parameters:  # Adafactor has beta1 instead
        kwargs["betas"] = betas
    kwargs.update({k: v for k, (v, _) in FIXED_ARGS.get(name, {}).items()}, **DEFAULT_ARGS.get(name, {}))
    extra = checked_optimizer_args(name, optimizer_args or {})
    try:
        return cls(list(param_groups), **{**kwargs, **extra})
    except (ValueError, TypeError) as e:
        if not extra:
            raise
        # the class's own range checks (e.g. a negative eps): one error naming the arguments given
        given = ", ".join(f"{k}={v!r}" for k, v in extra.items())
        raise UserInputError(f"optimizer_args for {name} ({given}): {e}") from e


def warmup_steps(lr_warmup_steps: float, total_steps: int) -> int:
    """An int is a step count; a float in (0, 1) is a ratio of the total (kohya's convention)."""
    if 0 < lr_warmup_steps < 1:
        return int(round(lr_warmup_steps * total_steps))
    return int(lr_warmup_steps)


def make_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    lr_warmup_steps: float = 0,
    num_cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    if name not in SCHEDULES:
        raise UserInputError(f"unknown lr_scheduler {name!r}; allowed: {', '.join(SCHEDULES)}")
    # imported here: config checks import this module, and diffusers takes seconds to import
    from diffusers.optimization import get_scheduler

    kwargs = {}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = num_cycles
    if name == "polynomial":
        kwargs["power"] = power
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps(lr_warmup_steps, total_steps),
        num_training_steps=total_steps,
        **kwargs,
    )
