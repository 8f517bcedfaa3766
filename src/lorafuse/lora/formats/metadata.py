"""`ss_*` (kohya sd-scripts) and `modelspec.*` (Stability AI ModelSpec) metadata for the files we write.

Precedence, lowest first: defaults (title, date, resolution) < `ss_*` / `modelspec.*` carried from the
loaded file < values derived from the tensors and the target (rank, alpha, architecture; they must describe
the file actually written) < training settings < explicit `metadata=` entries. Other keys of a loaded file
(diffusers' adapter JSON, `sshs_*` hashes of the old tensors) are not carried: they describe another file.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping
from pathlib import Path

from lorafuse.errors import UserInputError
from lorafuse.families import FAMILIES
from lorafuse.lora.formats.common import effective_alpha
from lorafuse.lora.state import LoraState

MODELSPEC_ARCH = {name: f.modelspec_arch for name, f in FAMILIES.items()}
SS_BASE_VERSION = {name: f.ss_base_version for name, f in FAMILIES.items()}
DEFAULT_RESOLUTION = {name: f.default_resolution for name, f in FAMILIES.items()}
IMPLEMENTATION = {name: f.implementation for name, f in FAMILIES.items()}

# training setting name -> metadata key (kohya's names where kohya has one)
TRAINING_KEYS = {
    "learning_rate": "ss_learning_rate",
    "unet_lr": "ss_unet_lr",
    "text_encoder_lr": "ss_text_encoder_lr",
    "max_train_steps": "ss_max_train_steps",
    "epochs": "ss_num_epochs",
    "batch_size": "ss_batch_size_per_device",
    "gradient_accumulation_steps": "ss_gradient_accumulation_steps",
    "lr_scheduler": "ss_lr_scheduler",
    "lr_warmup_steps": "ss_lr_warmup_steps",
    "optimizer": "ss_optimizer",
    "mixed_precision": "ss_mixed_precision",
    "seed": "ss_seed",
    "noise_offset": "ss_noise_offset",
    "min_snr_gamma": "ss_min_snr_gamma",
    "loss_type": "ss_loss_type",
    "huber_c": "ss_huber_c",
    "huber_schedule": "ss_huber_schedule",
    "network_dropout": "ss_network_dropout",
    "caption_dropout_rate": "ss_caption_dropout_rate",
    "num_train_images": "ss_num_train_images",
    "num_reg_images": "ss_num_reg_images",
    "base_model": "ss_sd_model_name",
    "output_name": "ss_output_name",
    "comment": "ss_training_comment",
    "training_started_at": "ss_training_started_at",
    "training_finished_at": "ss_training_finished_at",
    "tag_frequency": "ss_tag_frequency",
    "dataset_dirs": "ss_dataset_dirs",
    # flow-matching training (kohya's flux_train_network writes the same ss_* keys)
    "timestep_sampling": "ss_timestep_sampling",
    "sigmoid_scale": "ss_sigmoid_scale",
    "discrete_flow_shift": "ss_discrete_flow_shift",
    "model_prediction_type": "ss_model_prediction_type",
    "weighting_scheme": "ss_weighting_scheme",
    "logit_mean": "ss_logit_mean",
    "logit_std": "ss_logit_std",
    "mode_scale": "ss_mode_scale",
    "guidance_scale": "ss_guidance_scale",
    "author": "modelspec.author",
    "description": "modelspec.description",
    "license": "modelspec.license",
    "tags": "modelspec.tags",
    "trigger_phrase": "modelspec.trigger_phrase",
    "title": "modelspec.title",
    # handled specially below (they set two keys each)
    "resolution": None,
    "clip_skip": None,
    "v_parameterization": None,
}


KOHYA_NETWORK_KEYS = (
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_base_model_version",
    "ss_v2",
    "ss_network_train_unet_only",
    "ss_network_train_text_encoder_only",
)


def to_str(value: object) -> str:
    """safetensors metadata is str -> str. JSON for containers, kohya's `True`/`False` for booleans."""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def _uniform_or_dynamic(values: list[float]) -> str:
    if not values:
        return "0"
    if len(set(values)) > 1:
        return "Dynamic"  # what kohya's resize_lora writes for per-module ranks
    v = values[0]
    return str(int(v)) if float(v).is_integer() else str(v)


def training_metadata(training: Mapping[str, object]) -> dict[str, str]:
    unknown = sorted(set(training) - set(TRAINING_KEYS))
    if unknown:
        raise UserInputError(
            f"unknown training metadata {', '.join(unknown)}; known: {', '.join(sorted(TRAINING_KEYS))} "
            "(anything else can go in metadata= under its own key)"
        )
    out: dict[str, str] = {}
    for name, value in training.items():
        if value is None:
            continue
        key = TRAINING_KEYS[name]
        if key is not None:
            out[key] = to_str(value)
        elif name == "resolution":
            w, h = (value, value) if isinstance(value, int) else tuple(value)
            out["ss_resolution"] = f"({w}, {h})"
            out["modelspec.resolution"] = f"{w}x{h}"
        elif name == "clip_skip":
            out["ss_clip_skip"] = to_str(value)
            out["modelspec.encoder_layer"] = to_str(value)
        elif name == "v_parameterization":
            out["ss_v_parameterization"] = to_str(bool(value))
            out["modelspec.prediction_type"] = "v" if value else "epsilon"
    return out


def build_metadata(
    state: LoraState,
    *,
    fmt: str,
    arch: str,
    path: Path,
    training: Mapping[str, object] | None,
) -> dict[str, str]:
    res = DEFAULT_RESOLUTION[arch]
    meta: dict[str, str] = {
        "modelspec.title": path.stem,
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.resolution": f"{res}x{res}",
    }
    prediction = FAMILIES[arch].modelspec_prediction_type
    if prediction is not None:  # FLUX.1's rectified flow is neither epsilon nor v
        meta["modelspec.prediction_type"] = prediction
    meta.update({k: v for k, v in state.metadata.items() if k.startswith(("ss_", "modelspec."))})

    meta["modelspec.sai_model_spec"] = "1.0.0"
    meta["modelspec.architecture"] = f"{MODELSPEC_ARCH[arch]}/lora"
    meta["modelspec.implementation"] = IMPLEMENTATION[arch]
    if fmt == "kohya":
        # kohya's conv_dim / conv_alpha cover kernels larger than 1x1 (LoCon); everything else is network_dim
        low_rank = [m for m in state.modules.values() if m.down is not None]
        conv = [m for m in low_rank if math.prod(m.down.shape[2:]) > 1]
        linear = [m for m in low_rank if math.prod(m.down.shape[2:]) == 1]
        meta["ss_network_module"] = FAMILIES[arch].kohya_network_module
        meta["ss_network_dim"] = _uniform_or_dynamic([m.rank for m in linear])
        meta["ss_network_alpha"] = _uniform_or_dynamic([effective_alpha(m) for m in linear])
        if conv:
            meta["ss_network_args"] = json.dumps(
                {
                    "conv_dim": _uniform_or_dynamic([m.rank for m in conv]),
                    "conv_alpha": _uniform_or_dynamic([effective_alpha(m) for m in conv]),
                }
            )
        else:
            meta.pop("ss_network_args", None)
        meta["ss_base_model_version"] = SS_BASE_VERSION[arch]
        meta["ss_v2"] = "False"
        # which parts were trained, as kohya records them (A1111's "network_train_unet_only" display)
        comps = state.components()
        denoiser = {"unet", "transformer"}
        meta["ss_network_train_unet_only"] = to_str(comps <= denoiser)
        meta["ss_network_train_text_encoder_only"] = to_str(not comps & denoiser)
    else:
        for key in KOHYA_NETWORK_KEYS:
            meta.pop(key, None)  # they describe a kohya network module; training ss_* keys stay

    if training:
        meta.update(training_metadata(training))
    return meta
