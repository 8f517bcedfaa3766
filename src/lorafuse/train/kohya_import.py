"""kohya sd-scripts configs in: the flat `train_network.py --config_file` TOML (as the kohya_ss GUI saves it), the
same keys as `--flags`, and `--dataset_config` files, converted to our typed `TrainConfig`.

    imp = import_kohya_file("config_lora-20240101-120000.toml")   # -> KohyaImport
    imp.data        # our nested TOML data ([model], [dataset], ...); config_from_dict(TrainConfig, imp.data)
    imp.table()     # every kohya key: mapped (to which field), no effect (why) or refused (why)

Which key does what is decided in `kohya_keys.RULES`; this module converts values whose format differs and
collects every refused key into one error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorafuse.errors import ConfigError
from lorafuse.train.kohya_common import KohyaImport, Row, parse_resolution, read_toml, round_bucket_limits
from lorafuse.train.kohya_dataset import convert_dataset_config
from lorafuse.train.kohya_keys import KOHYA_DEFAULTS, OPTIMIZERS, RULES, Rule
from lorafuse.train.kohya_network_args import network_args as _network_args
from lorafuse.train.kohya_network_args import split_args

_OUR_TABLES = ("model", "dataset", "network", "optimizer", "scheduler", "loss", "training")


def looks_like_kohya(data: Mapping[str, Any]) -> bool:
    """kohya's config is flat (top-level values), or sections of flat values whose names are not our tables
    ([model_arguments], [training_arguments], ...); ours has only tables ([model], [dataset], ...)."""
    if any(not isinstance(v, Mapping) for v in data.values()):
        return True
    return bool(data) and not any(k in _OUR_TABLES for k in data)


def check_one_layout(data: Mapping[str, Any], source: str) -> None:
    """Our tables and top-level values in one file: read as kohya's, one stray key would switch a lorafuse config
    to kohya's defaults (its .caption extension, its epoch count) without a word; read as ours, it is unknown."""
    import dataclasses
    import typing

    from lorafuse.train.config import TrainConfig

    ours = [k for k, v in data.items() if k in _OUR_TABLES and isinstance(v, Mapping)]
    flat = [k for k, v in data.items() if not isinstance(v, Mapping)]
    if not (ours and flat):
        return
    hints = typing.get_type_hints(TrainConfig)
    home = {f.name: t.name for t in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(hints[t.name])
            for f in dataclasses.fields(hints[t.name])}  # fmt: skip
    where = f"; it belongs in [{home[flat[0]]}]" if flat[0] in home else ""
    raise ConfigError(
        f"{source}: top-level key '{flat[0]}' next to lorafuse tables ([{ours[0]}]): a lorafuse config keeps every "
        f"key in its table{where}, and a kohya config has no [{ours[0]}] table. Move the key, or convert the kohya "
        "config with `lorafuse config`"
    )


def flatten_sections(data: Mapping[str, Any]) -> dict[str, Any]:
    """kohya's read_config_from_file reads one level of tables as if flat (the sectioned TOML that many shared
    configs use: [model_arguments], [optimizer_arguments], ...); keys of a section win over flat ones, as there."""
    flat = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
    for section in (v for v in data.values() if isinstance(v, Mapping)):
        flat.update(section)
    return flat


def import_kohya_file(path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> KohyaImport:
    """Convert a kohya flat config file (plus kohya flags in `extra`, which win); refused keys raise one error."""
    from lorafuse.train.kohya_gui_preset import check_not_gui_settings

    check_not_gui_settings(path)
    flat = {**flatten_sections(read_toml(path)), **(extra or {})}
    check_not_gui_settings(path, flat)
    imp = convert_flat(flat)
    imp.check(str(path))
    return imp


def cli_value(text: Any) -> Any:
    """A kohya flag's string as kohya's argparse would type it: true/false, numbers, else the string."""
    if isinstance(text, list):
        return [cli_value(t) for t in text]
    if not isinstance(text, str):
        return text
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def convert_flat(flat: Mapping[str, Any], *, defaults: bool = True) -> KohyaImport:
    """Every key of a flat kohya config, converted or refused (collected in `.refused`, not raised)."""
    imp = KohyaImport()
    # dataset_config last: its [general] values override the flat keys of the same name, as in kohya
    for key in sorted(flat, key=lambda k: (k == "dataset_config", k)):
        value = flat[key]
        rule = RULES.get(key)
        if rule is None:
            imp.refuse(
                key, value, "unknown kohya key (not an option of train_network.py as lorafuse knows it)"
            )
        elif rule.action == "note":
            imp.note(key, value, rule.reason)
        elif rule.action == "refuse":
            if rule.is_inactive(value):
                imp.note(key, value, "off")
            else:
                imp.refuse(key, value, rule.reason)
        else:
            _convert(imp, key, value, rule, flat)
    if defaults:
        _kohya_defaults(imp, flat)
    round_bucket_limits(imp)
    training = imp.data.get("training", {})
    if not training.get("sample_prompts") and "sample_prompts" not in flat:
        for key in ("sample_every_n_epochs", "sample_every_n_steps"):
            if training.pop(key, None) is not None:  # kohya logs that the prompt file is missing and trains on
                imp.rows = [r for r in imp.rows if r.key != key]
                imp.note(key, flat.get(key), "no sample_prompts: no samples (kohya skips them too)")
    return imp


def _kohya_defaults(imp: KohyaImport, flat: Mapping[str, Any]) -> None:
    if "caption_extension" not in flat and "dataset_config" not in flat:
        imp.put(
            "dataset.caption_extension",
            KOHYA_DEFAULTS["caption_extension"],
            "caption_extension",
            None,
            "kohya's default",
            action="default",
        )
    if "learning_rate" not in flat:
        imp.put(
            "optimizer.learning_rate",
            KOHYA_DEFAULTS["learning_rate"],
            "learning_rate",
            None,
            "kohya's default",
            action="default",
        )
    from lorafuse.train.optim import CLASS_DEFAULTS

    optimizer = imp.data.get("optimizer", {}).get("optimizer_type", "AdamW")
    given = {r.key for r in imp.rows}  # also a refused one: its row already says what is wrong
    for arg, value in CLASS_DEFAULTS.get(optimizer, {}).items():
        # kohya passes only optimizer_args: without the argument, the class's own default
        if arg not in imp.data.get("optimizer", {}) and f"optimizer_args.{arg}" not in given:
            shown = list(value) if isinstance(value, tuple) else value
            imp.put(f"optimizer.{arg}", shown, f"optimizer_args.{arg}", None, f"{optimizer}'s own default, as kohya runs it",
                    action="default")  # fmt: skip
    if "seed" not in flat:
        imp.note("seed", None, "kohya draws a random seed; lorafuse uses training.seed = 42 so runs repeat")


def _convert(imp: KohyaImport, key: str, value: Any, rule: Rule, flat: Mapping[str, Any]) -> None:
    handler = _HANDLERS.get(key)
    if key in ("network_args", "optimizer_args") and not value:
        imp.note(key, value, "off")
    elif handler is not None:
        handler(imp, key, value, flat)
    else:
        imp.put(rule.target, value, key, value)


# --- per-key conversions ------------------------------------------------------------------------------------


def _resolution(imp, key, value, flat):
    try:
        imp.put("dataset.resolution", parse_resolution(value), key, value)
    except (TypeError, ValueError):
        imp.refuse(key, value, 'expected a size such as 512 or "512,768" (width,height)')


def _lr(imp, key, value, flat):
    target = "optimizer.text_encoder_lr" if key == "text_encoder_lr" else "optimizer.unet_lr"
    values = value if isinstance(value, list) else [value]
    distinct = sorted({float(v) for v in values})
    if len(distinct) > 1:
        imp.refuse(key, value, "one learning rate for both SDXL text encoders; give a single value")
    elif distinct and distinct[0] > 0:
        imp.put(target, distinct[0], key, value)
    elif key == "text_encoder_lr" and distinct:  # 0: the GUI's way of saying "train the UNet only"
        imp.put("network.network_train_unet_only", True, key, value, "a text-encoder LR of 0")
    else:
        imp.note(key, value, "unset")


def _optimizer_type(imp, key, value, flat):
    name = OPTIMIZERS.get(str(value).strip().lower() or "adamw")
    if name is None:
        imp.refuse(key, value, f"not supported; use one of {', '.join(OPTIMIZERS.values())}")
    else:
        imp.put("optimizer.optimizer_type", name, key, value)


def _old_switch(imp, key, value, flat):
    """kohya's use_8bit_adam / use_lion_optimizer, which count only without an optimizer_type, as there."""
    if value and "optimizer_type" not in flat and flat.get("use_8bit_adam") and flat.get("use_lion_optimizer"):
        imp.refuse(key, value, "use_8bit_adam and use_lion_optimizer both on; kohya refuses that too")
    elif value and "optimizer_type" not in flat:
        imp.put("optimizer.optimizer_type", {"use_8bit_adam": "AdamW8bit"}.get(key, "Lion"), key, value)
    else:
        imp.note(key, value, "optimizer_type decides" if value else "off")


def _checkpointing(imp, key, value, flat):
    """kohya turns gradient_checkpointing on whenever cpu_offload_checkpointing is on (what it offloads)."""
    value, offload = bool(cli_value(value)), bool(cli_value(flat.get("cpu_offload_checkpointing", False)))
    if key == "cpu_offload_checkpointing":
        imp.put("training.cpu_offload_checkpointing", bool(value), key, value)
        if value and "gradient_checkpointing" not in flat:
            imp.data["training"]["gradient_checkpointing"] = True
    else:
        how = "cpu_offload_checkpointing turns it on, as in kohya" if offload and not value else ""
        imp.put("training.gradient_checkpointing", bool(value) or offload, key, value, how)


def _fp8_base(imp, key, value, flat):
    if value:
        imp.put("model.quantize_base", "fp8", key, value)
    else:
        imp.note(key, value, "off")


def _optimizer_args(imp, key, value, flat):
    """One row per argument: weight_decay= / betas= to our fields (kohya users write them here, as kohya's
    Prodigy and Adafactor take them no other way), the rest to optimizer.optimizer_args, checked against the
    optimizer class when the config names it (flags alone may go with a lorafuse config that names another: then
    the config's own check decides)."""
    name = OPTIMIZERS.get(str(flat.get("optimizer_type", "")).strip().lower())
    try:
        args = split_args(value)
    except ValueError as e:
        imp.refuse(key, value, str(e))
        return
    for k, v in args:
        sub = f"{key}.{k}"
        if k == "weight_decay" and _is_number(v):
            imp.put("optimizer.weight_decay", float(v), sub, v, "lorafuse's field for it")
        elif k == "betas" and isinstance(v, (tuple, list)) and len(v) == 2 and all(map(_is_number, v)):
            imp.put("optimizer.betas", [float(b) for b in v], sub, v, "lorafuse's field for it")
        elif k in ("weight_decay", "betas"):
            imp.refuse(sub, v, "expected a number" if k == "weight_decay" else "expected two numbers, e.g. 0.9,0.99")
        elif name is not None and (why := _arg_problem(name, k, v)) is not None:
            imp.refuse(sub, v, why)
        else:
            imp.data.setdefault("optimizer", {}).setdefault("optimizer_args", {})[k] = _toml_value(v)
            imp.rows.append(Row(sub, v, "mapped", f"optimizer.optimizer_args.{k} = {_toml_value(v)!r}"))


def _arg_problem(name: str, k: str, v: Any) -> str | None:
    from lorafuse.train.optim import arg_problem
    from lorafuse.utils.extras import MissingExtraError

    try:
        return arg_problem(name, k, v)
    except MissingExtraError:
        return None  # the run names the package to install before any model loads


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _toml_value(v: Any) -> Any:
    """kohya's literal_eval'd value as TOML holds it: a tuple (betas=0.9,0.99) as an array."""
    return list(v) if isinstance(v, tuple) else v


def _network_module(imp, key, value, flat):
    if value == "networks.lora_flux":  # kohya's FLUX.1 LoRA: networks.lora picks the modules by the base's family
        imp.put("network.network_module", "networks.lora", key, value)
    elif value in ("networks.lora", "lycoris.kohya"):
        imp.put("network.network_module", value, key, value)
    else:
        imp.refuse(
            key, value, "not supported; use networks.lora (LoRA, LoCon with conv_dim) or lycoris.kohya"
        )


def _log_with(imp, key, value, flat):
    if value == "tensorboard":
        imp.put("training.logging", "tensorboard", key, value)
    elif value in ("", None):
        imp.note(key, value, "off")
    else:
        imp.refuse(key, value, "only tensorboard (or none: CSV logs and a loss plot are always written)")


def _epoch(imp, key, value, flat):
    if "max_train_epochs" in flat or "max_train_steps" in flat:
        imp.note(key, value, "the kohya_ss GUI's epoch count; max_train_epochs / max_train_steps decide")
    else:
        imp.put("training.max_train_epochs", int(value), key, value, "the kohya_ss GUI's epoch count")


def _save_state_on_train_end(imp, key, value, flat):
    if value:
        imp.put("training.save_state", True, key, value, "lorafuse also writes a state with every save")
    else:
        imp.note(key, value, "off")


def _huber(imp, key, value, flat):
    kohya_default = {"huber_c": 0.1, "huber_schedule": "snr"}[key]
    if flat.get("loss_type", "l2") in ("l2", "l1") and value == kohya_default:
        imp.note(key, value, f"kohya's default, unused with loss_type = {flat.get('loss_type', 'l2')!r}")
    else:
        imp.put(f"loss.{key}", value, key, value)


def _data_dir(imp, key, value, flat):
    if "dataset_config" in flat:
        imp.note(key, value, "dataset_config is set; kohya ignores this key then as well")
    elif value:
        imp.put(f"dataset.{key}", value, key, value)
    else:
        imp.note(key, value, "unset")


def _sample_prompts(imp, key, value, flat):
    from lorafuse.train.kohya_prompts import read_prompt_file

    sampling = any(flat.get(k) for k in ("sample_every_n_epochs", "sample_every_n_steps", "sample_at_first"))
    if not sampling and not Path(str(value)).exists():
        # the GUI always names the prompt file it writes beside the outputs; kohya opens it only to sample
        imp.note(key, value, "not read: no sample_every_n_epochs / _steps, so no samples are made (as kohya)")
        return
    try:
        prompts, dropped = read_prompt_file(value)
    except ConfigError as e:
        imp.refuse(key, value, str(e))
        return
    imp.put("training.sample_prompts", prompts, key, value, f"{len(prompts)} prompts read from the file")
    for option in dropped:
        imp.note(
            f"{key} {option}", value, "per-prompt sampling option; samples use resolution, sample_steps and seed"
        )


def _dataset_config(imp, key, value, flat):
    convert_dataset_config(imp, Path(value), flat)


def _zero_is_off(imp, key, value, flat):
    rule = RULES[key]
    if value in (0, 0.0, None, False):
        imp.note(key, value, "off")
    else:
        imp.put(rule.target, value, key, value)


_HANDLERS = {
    "scale_weight_norms": _zero_is_off,
    "resolution": _resolution,
    "text_encoder_lr": _lr,
    "unet_lr": _lr,
    "optimizer_type": _optimizer_type,
    "use_8bit_adam": _old_switch,
    "use_lion_optimizer": _old_switch,
    "fp8_base": _fp8_base,
    "cpu_offload_checkpointing": _checkpointing,
    "gradient_checkpointing": _checkpointing,
    "fp8_base_unet": _fp8_base,
    "optimizer_args": _optimizer_args,
    "network_args": _network_args,
    "network_module": _network_module,
    "log_with": _log_with,
    "epoch": _epoch,
    "save_state_on_train_end": _save_state_on_train_end,
    "huber_c": _huber,
    "huber_schedule": _huber,
    "train_data_dir": _data_dir,
    "reg_data_dir": _data_dir,
    "sample_prompts": _sample_prompts,
    "dataset_config": _dataset_config,
}


def load_train_config_any(
    path: str | os.PathLike | None,
    overrides: Mapping[str, Any] | None = None,
    kohya_flags: Mapping[str, Any] | None = None,
):
    """`TrainConfig` from our TOML or a kohya flat TOML (detected by its layout), plus our dotted overrides and
    kohya-only flags. Returns (config, KohyaImport or None)."""
    from lorafuse.config.toml_io import build_config
    from lorafuse.train.config import TrainConfig
    from lorafuse.train.kohya_gui_preset import check_not_gui_settings

    if path is not None:
        check_not_gui_settings(path)
    data = read_toml(path) if path is not None else {}
    source = "<defaults>" if path is None else str(path)
    check_one_layout(data, source)
    flags = {k: cli_value(v) for k, v in (kohya_flags or {}).items()}
    imp = None
    if path is not None and looks_like_kohya(data):
        data = flatten_sections(data)
        check_not_gui_settings(path, data)
        # the GUI's `epoch` counts only while no step / epoch limit is given, also on the command line
        limits = {"training.max_train_steps", "training.max_train_epochs"} & set(overrides or {})
        epoch = data.pop("epoch", None) if limits else None
        imp = convert_flat({**data, **flags})
        if epoch is not None:
            imp.note("epoch", epoch, f"the kohya_ss GUI's epoch count; {sorted(limits)[0]} on the command line decides")
        imp.check(f"{source} (kohya config)")
        data = imp.data
        source += " (kohya config)"
    elif flags:
        imp = convert_flat(flags, defaults=False)
        imp.check("kohya flags")
        for table, values in imp.data.items():
            data.setdefault(table, {}).update(values)
    return build_config(TrainConfig, data, source, overrides), imp
