"""The kohya_ss GUI's own settings files (its "Configuration file" Save / Load, and the presets it ships), as
opposed to the `train_network.py --config_file` TOML the GUI writes from them when training starts.

They hold the GUI's form fields (`LoRA_type`, `max_resolution`, `optimizer`, `lr_warmup` in percent, ...); the
GUI turns them into kohya's options with its own rules (max_train_steps counted from the image folders, warmup
from a percentage, network_args from the LoRA type), so lorafuse does not guess them: it names the file to pass.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lorafuse.errors import ConfigError

# form fields of kohya_gui/lora_gui.py's save_configuration that are not train_network.py options
GUI_ONLY = frozenset(
    "LoRA_type LyCORIS_preset max_resolution optimizer lr_warmup model_list lora_network_weights use_wandb "
    "additional_parameters num_cpu_threads_per_process num_processes num_machines multi_gpu gpu_ids "
    "main_process_port sdxl_cache_text_encoder_outputs sdxl_no_half_vae stop_text_encoder_training_pct "
    "extra_accelerate_launch_args training_preset flux1_checkbox dynamo_mode dynamo_use_fullgraph "
    "dynamo_use_dynamic".split()
)
_WHAT_TO_PASS = (
    "lorafuse reads the config train_network.py reads, which the GUI writes when you press \"Print training "
    "command\" or start training: <output_dir>/config_lora-<date>-<time>.toml (pass it to `lorafuse train` or "
    "`lorafuse config import`, with any flags the GUI prints after it)"
)


def gui_fields(data: dict[str, Any]) -> list[str]:
    return sorted(k for k in data if k in GUI_ONLY)


def check_not_gui_settings(path: str | os.PathLike, data: dict[str, Any] | None = None) -> None:
    """One clear error for a kohya_ss GUI settings file (JSON, or TOML with the GUI's field names)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            parsed = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            parsed = None
        if isinstance(parsed, dict) and gui_fields(parsed):
            raise ConfigError(
                f"{path}: a kohya_ss GUI settings file (fields {', '.join(gui_fields(parsed)[:4])}, ...), not a "
                f"training config; {_WHAT_TO_PASS}"
            )
        raise ConfigError(f"{path}: lorafuse and kohya training configs are TOML files, not JSON")
    if data is not None and gui_fields(data):
        raise ConfigError(
            f"{path}: the kohya_ss GUI's field names ({', '.join(gui_fields(data)[:4])}), not train_network.py's "
            f"options; {_WHAT_TO_PASS}"
        )
