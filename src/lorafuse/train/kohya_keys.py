"""Every option of kohya's train_network.py / sdxl_train_network.py / flux_train_network.py (and the keys the
kohya_ss GUI writes into its `--config_file` TOML), each either mapped to a `TrainConfig` field or handled by name
with the reason.

Three actions:
- map:    the value goes to our field (same name unless `target` says otherwise), converted where the formats
          differ (kohya's "512,768" resolution, its list of text-encoder LRs, its prompt file);
- note:   accepted, no effect on training here, and the reason is printed (memory and speed switches such as
          xformers, data-loader workers);
- refuse: a setting that would change training in a way lorafuse does not reproduce; its inactive values
          (false, 0, empty, or the named default) are accepted, anything else is an error naming key and reason.
A key in none of these tables is refused as unknown: nothing is ever silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

INACTIVE = (None, False, 0, 0.0, "", [], ())


@dataclass(frozen=True)
class Rule:
    action: Literal["map", "note", "refuse"]
    target: str = ""  # our dotted key (map)
    reason: str = ""  # why (note, refuse) or how (map)
    ok: tuple = INACTIVE  # values of a refused key that mean "off", accepted as no-ops

    def is_inactive(self, value: Any) -> bool:
        if isinstance(value, str) and value.strip().lower() in ("false", "0", "none", ""):
            return True
        return value in self.ok


def _map(target: str, how: str = "") -> Rule:
    return Rule("map", target, how)


def _note(reason: str) -> Rule:
    return Rule("note", reason=reason)


def _refuse(reason: str, ok: tuple = INACTIVE) -> Rule:
    return Rule("refuse", reason=reason, ok=ok)


# kohya keys with the same name and meaning as one of our fields: table of each.
SAME_NAME: dict[str, str] = {
    "model": "pretrained_model_name_or_path v_parameterization clip_skip guidance_scale",
    "dataset": "train_data_dir reg_data_dir resolution caption_extension shuffle_caption keep_tokens "
    "caption_dropout_rate caption_tag_dropout_rate flip_aug random_crop enable_bucket min_bucket_reso "
    "max_bucket_reso bucket_reso_steps bucket_no_upscale cache_latents cache_latents_to_disk "
    "cache_text_encoder_outputs cache_text_encoder_outputs_to_disk prior_loss_weight "
    "max_token_length validation_split validation_seed alpha_mask t5xxl_max_token_length",
    "network": "network_module network_dim network_alpha network_dropout network_weights dim_from_weights "
    "network_train_unet_only network_train_text_encoder_only",
    "optimizer": "optimizer_type learning_rate unet_lr text_encoder_lr max_grad_norm loraplus_lr_ratio "
    "loraplus_unet_lr_ratio loraplus_text_encoder_lr_ratio scale_weight_norms",
    "scheduler": "lr_scheduler lr_warmup_steps lr_scheduler_num_cycles lr_scheduler_power",
    "loss": "loss_type huber_c huber_schedule min_snr_gamma debiased_estimation_loss noise_offset "
    "multires_noise_iterations multires_noise_discount min_timestep "
    "max_timestep masked_loss "
    "timestep_sampling sigmoid_scale discrete_flow_shift model_prediction_type weighting_scheme logit_mean "
    "logit_std mode_scale",
    "training": "max_train_epochs max_train_steps train_batch_size gradient_accumulation_steps "
    "gradient_checkpointing blocks_to_swap mixed_precision seed output_dir output_name save_every_n_epochs save_every_n_steps "
    "save_state save_precision save_model_as save_last_n_epochs save_last_n_steps save_last_n_epochs_state "
    "save_last_n_steps_state sample_every_n_epochs sample_every_n_steps sample_prompts validate_every_n_steps",
}

_MEMORY = "memory and speed switch; PyTorch's scaled_dot_product_attention and accelerate choose here"
_LOADER = "batches are prepared in the training process; no worker processes to configure"
_META = "descriptive metadata; lorafuse writes its own ss_* / modelspec.* training metadata"
_UPLOAD = "lorafuse never uploads anything (no Hugging Face / wandb access at run time)"
_LOSS = "a loss or noise variant lorafuse does not implement; training would differ from kohya's"
_CAPTION = "a caption feature lorafuse does not implement"
_OTHER_ARCH = "an option of kohya's SD3 / SD2 trainers, not of SD1.5 / SDXL / FLUX.1 LoRA training"
_FLUX_PARTS = (
    "a separate FLUX.1 file beside the transformer file (pretrained_model_name_or_path); tokenizers from "
    "model.tokenizers or the local Hugging Face cache"
)

RULES: dict[str, Rule] = {
    # --- mapped with a conversion or another name
    "dataset_config": _map(
        "dataset.subsets", "read and converted: [general], [[datasets]], [[datasets.subsets]]"
    ),
    "epoch": _map(
        "training.max_train_epochs",
        "kohya_ss GUI key; used when max_train_epochs / max_train_steps are unset",
    ),
    "use_8bit_adam": _map("optimizer.optimizer_type", "true -> AdamW8bit (kohya's old switch)"),
    "optimizer_args": _map(
        "optimizer.optimizer_args",
        "each k=v checked against the optimizer class's arguments (values read as kohya reads them: True, 2, "
        "0.9,0.99); weight_decay= and betas= go to optimizer.weight_decay / optimizer.betas; lr= and arguments "
        "lorafuse fixes (Adafactor's relative_step=True) refused by name",
    ),
    "network_args": _map(
        "network.conv_dim",
        "conv_dim, conv_alpha, algo, factor, preset (network.lycoris_preset), block_dims, block_alphas, "
        "conv_block_dims, conv_block_alphas, down_lr_weight, mid_lr_weight, up_lr_weight, block_lr_zero_threshold; "
        "FLUX.1: train_blocks, train_double_block_indices, train_single_block_indices (to network.layers); the "
        "GUI's other LyCORIS arguments at their off values (rank_dropout=0, use_tucker=False, ...) accepted, other "
        "values refused by name",
    ),
    "log_with": _map("training.logging", "tensorboard; wandb is refused"),
    "save_state_on_train_end": _map(
        "training.save_state", "lorafuse then also writes a state with every save"
    ),
    # --- accepted, no effect here
    "xformers": _note(_MEMORY),
    "sdpa": _note(_MEMORY),
    "mem_eff_attn": _note(_MEMORY),
    "lowram": _note(_MEMORY),
    "lowvram": _note(_MEMORY),
    "highvram": _note(_MEMORY),
    "vae_batch_size": _note("latents are encoded in lorafuse's own batches; results do not depend on it"),
    "no_half_vae": _note("the VAE always keeps its own dtype here (fp16 SD VAEs overflow)"),
    "max_data_loader_n_workers": _note(_LOADER),
    "persistent_data_loader_workers": _note(_LOADER),
    "logging_dir": _note("logs go to output_dir/logs"),
    "log_prefix": _note("log files are named after output_name"),
    "log_tracker_name": _note("the tensorboard run is named after output_name"),
    "log_tracker_config": _note("no tracker configuration"),
    "log_config": _note("the effective config is always saved as output_dir/output_name.toml"),
    "training_comment": _note(_META),
    "metadata_title": _note(_META),
    "metadata_author": _note(_META),
    "metadata_description": _note(_META),
    "metadata_license": _note(_META),
    "metadata_tags": _note(_META),
    "sample_sampler": _note("samples use the base model's own scheduler"),
    "sample_at_first": _note("no sample grid before the first step; grids come every sample_every_n_epochs"),
    "sdxl": _note("the architecture is read from the base model"),
    "skip_cache_check": _note("caches are checked by content fingerprints, which is cheap"),
    "disable_mmap_load_safetensors": _note("loading is done by diffusers"),
    "tokenizer_cache_dir": _note("tokenizers come with the base model; nothing downloads"),
    "dynamo_backend": _note("no torch.compile here"),
    "torch_compile": _note("no torch.compile here"),
    "ddp_timeout": _note("multi-GPU settings come from `accelerate launch`"),
    "ddp_gradient_as_bucket_view": _note("multi-GPU settings come from `accelerate launch`"),
    "ddp_static_graph": _note("multi-GPU settings come from `accelerate launch`"),
    "console_log_level": _note("console logging is fixed"),
    "console_log_file": _note("console logging is fixed"),
    "console_log_simple": _note("console logging is fixed"),
    "output_config": _note("use `lorafuse config import` to write a lorafuse config"),
    "config_file": _note("this file is the config"),
    "wandb_run_name": _note("no wandb logging (see log_with)"),
    "cache_info": _note("image sizes are read once per run"),
    "resize_interpolation": _note("images resize with LANCZOS (kohya's default for upscaling)"),
    # --- refused unless off
    "v2": _refuse(
        "SD 2.x bases are not supported (lorafuse trains SD1.5, SDXL and the built-in world model)"
    ),
    "vae": _refuse(
        "a separate VAE file is not loaded; use a base folder or checkpoint that holds the VAE you want"
    ),
    "in_json": _refuse(
        "fine-tuning metadata datasets are not supported; use train_data_dir or dataset_config subsets"
    ),
    "dataset_repeats": _refuse("fine-tuning metadata datasets are not supported; use num_repeats in subsets"),
    "color_aug": _refuse("color augmentation is not implemented"),
    "face_crop_aug_range": _refuse("face-crop augmentation is not implemented"),
    "keep_tokens_separator": _refuse(_CAPTION),
    "caption_separator": _refuse(_CAPTION + " (tags are split on ',')", ok=(*INACTIVE, ",")),
    "secondary_separator": _refuse(_CAPTION),
    "enable_wildcard": _refuse(_CAPTION),
    "caption_prefix": _refuse(_CAPTION),
    "caption_suffix": _refuse(_CAPTION),
    "token_warmup_min": _refuse(_CAPTION, ok=(*INACTIVE, 1)),
    "token_warmup_step": _refuse(_CAPTION),
    "weighted_captions": _refuse(_CAPTION + " ((word:1.2) weights)"),
    "caption_dropout_every_n_epochs": _refuse(
        "caption dropout per epoch is not implemented (caption_dropout_rate is)"
    ),
    "full_fp16": _refuse(
        "LoRA factors always train in float32 here; mixed_precision casts only the frozen base"
    ),
    "full_bf16": _refuse(
        "LoRA factors always train in float32 here; mixed_precision casts only the frozen base"
    ),
    "fp8_base": _map("model.quantize_base", "true -> fp8 (a CUDA GPU with float8; int8 runs everywhere)"),
    "fp8_base_unet": _map("model.quantize_base", "true -> fp8: only the denoiser is stored in 8 bits here anyway"),
    "adaptive_noise_scale": _refuse(_LOSS),
    "noise_offset_random_strength": _refuse(_LOSS),
    "noise_offset_type": _note("the kohya_ss GUI's choice; noise_offset and multires_noise_* decide"),
    "ip_noise_gamma": _refuse(_LOSS),
    "ip_noise_gamma_random_strength": _refuse(_LOSS),
    "zero_terminal_snr": _refuse(_LOSS),
    "scale_v_pred_loss_like_noise_pred": _refuse(_LOSS),
    "v_pred_like_loss": _refuse(_LOSS),
    "huber_scale": _refuse(_LOSS, ok=(*INACTIVE, 1, 1.0)),
    "block_lr": _refuse(
        "per-block LRs of kohya's full SDXL fine-tune; for a LoRA use network_args down_lr_weight / mid_lr_weight "
        "/ up_lr_weight"
    ),
    "base_weights": _refuse(
        "merging other LoRAs into the base before training is not supported; bake them first"
    ),
    "base_weights_multiplier": _refuse("merging other LoRAs into the base before training is not supported"),
    "network_multiplier": _refuse(
        "a LoRA multiplier other than 1 during training is not supported", ok=(*INACTIVE, 1, 1.0)
    ),
    "stop_text_encoder_training": _refuse("stopping text-encoder training early is not implemented"),
    "lr_scheduler_type": _refuse("custom scheduler classes are not supported; use lr_scheduler"),
    "lr_scheduler_args": _refuse("scheduler arguments are not supported"),
    "lr_decay_steps": _refuse("warmup-stable-decay schedules are not implemented"),
    "lr_scheduler_timescale": _refuse("inverse-sqrt schedules are not implemented"),
    "lr_scheduler_min_lr_ratio": _refuse("min-LR schedules are not implemented"),
    "save_n_epoch_ratio": _refuse("use save_every_n_epochs"),
    "resume": _refuse(
        "kohya's resume folders are accelerate states lorafuse cannot read; continue from the LoRA file with "
        "network_weights, or resume a lorafuse state with --resume"
    ),
    "initial_epoch": _refuse("starting at a given epoch is not supported; resume a lorafuse state instead"),
    "initial_step": _refuse("starting at a given step is not supported; resume a lorafuse state instead"),
    "skip_until_initial_step": _refuse(
        "starting at a given step is not supported; resume a lorafuse state instead"
    ),
    "no_metadata": _refuse("lorafuse always writes kohya-style metadata (A1111 / ComfyUI read it)"),
    "debug_dataset": _refuse("use `lorafuse train --dry-run` to inspect the dataset"),
    "dataset_class": _refuse("custom dataset classes are not supported; use train_data_dir or dataset_config"),
    "validate_every_n_epochs": _refuse("use validate_every_n_steps"),
    "max_validation_steps": _refuse("the validation loss always covers the whole held-out set"),
    "deepspeed": _refuse("DeepSpeed is not supported; use `accelerate launch` for several GPUs"),
    "use_lion_optimizer": _map("optimizer.optimizer_type", "true -> Lion (kohya's old switch)"),
    "wandb_api_key": _refuse(_UPLOAD),
    "huggingface_repo_id": _refuse(_UPLOAD),
    "huggingface_token": _refuse(_UPLOAD),
    "huggingface_repo_type": _refuse(_UPLOAD),
    "huggingface_repo_visibility": _refuse(_UPLOAD),
    "huggingface_path_in_repo": _refuse(_UPLOAD),
    "save_state_to_huggingface": _refuse(_UPLOAD),
    "resume_from_huggingface": _refuse(_UPLOAD),
    "async_upload": _refuse(_UPLOAD),
    # --- kohya's FLUX.1 trainer (flux_train_network.py); its loss keys map by name above
    "ae": _map("model.ae", _FLUX_PARTS),
    "clip_l": _map("model.clip_l", _FLUX_PARTS),
    "t5xxl": _map("model.t5xxl", _FLUX_PARTS),
    "apply_t5_attn_mask": _refuse(
        "diffusers' FluxTransformer2DModel takes no text attention mask, and FluxPipeline samples without one; a "
        "LoRA trained with the mask would be sampled without it"
    ),
    "split_mode": _refuse("kohya's split_mode (deprecated there) is not implemented"),
    "cpu_offload_checkpointing": _map(
        "training.cpu_offload_checkpointing", "true turns gradient_checkpointing on as well, as kohya does"
    ),
    "single_blocks_to_swap": _note(_MEMORY),
    "double_blocks_to_swap": _note(_MEMORY),
    "fused_backward_pass": _note(_MEMORY),
    "mem_eff_save": _note("files are written by safetensors, atomically"),
    "text_encoder_batch_size": _note("captions are encoded in lorafuse's own batches; results do not depend on it"),
    **{
        k: _refuse(_OTHER_ARCH)
        for k in (
            "clip_g clip_l_dropout_rate clip_g_dropout_rate t5_dropout_rate enable_scaled_pos_embed "
            "pos_emb_random_crop_rate save_clip save_t5xxl t5xxl_device t5xxl_dtype"
        ).split()
    },
}
# same-name keys whose value is converted on the way (README's table shows how)
CONVERTED = {
    "resolution": '512, "512" or kohya\'s "W,H" string (e.g. "768,512") -> 512 or [768, 512]',
    "text_encoder_lr": "a number or the GUI's list (one value, or equal values for SDXL's two encoders); 0 "
    "means network_train_unet_only",
    "unet_lr": "0 or unset: learning_rate",
    "optimizer_type": "case-insensitive: AdamW, AdamW8bit, PagedAdamW8bit, Lion (bitsandbytes' 32-bit Lion, the "
    "update of kohya's lion-pytorch one), Lion8bit, Adafactor, Prodigy (others refused: lorafuse does not carry "
    "their packages or classes)",
    "network_module": "networks.lora, networks.lora_flux (as networks.lora) or lycoris.kohya (others refused)",
    "sample_prompts": "kohya's .txt prompt file is read, --n negative prompts kept; the other per-prompt options "
    "(--w, --s, --d, ...) are listed as dropped",
    "train_data_dir": "no effect when dataset_config is set (as in kohya)",
    "reg_data_dir": "no effect when dataset_config is set (as in kohya)",
    "huber_c": "kohya's default 0.1 with loss_type l2 / l1 is dropped as the no-op it is",
    "huber_schedule": "kohya's default 'snr' with loss_type l2 / l1 is dropped as the no-op it is",
    "caption_extension": "unset: kohya's default .caption",
    "learning_rate": "unset: kohya's default 2e-6",
    "masked_loss": "subsets' conditioning_data_dir mask images become their mask_dir; every image must have a "
    "mask (kohya trains an image without one unmasked, silently)",
    "model_prediction_type": "unset: raw (kohya's default is sigma_scaled, its FLUX guide recommends raw)",
    "guidance_scale": "unset: 1.0 (kohya's FLUX guide; its option's default is 3.5)",
}
for _table, _names in SAME_NAME.items():
    for _name in _names.split():
        RULES.setdefault(_name, _map(f"{_table}.{_name}", CONVERTED.get(_name, "")))

# kohya's defaults where they differ from ours: applied when a kohya config leaves the key out.
KOHYA_DEFAULTS = {"caption_extension": ".caption", "learning_rate": 2e-6}

OPTIMIZERS = {
    n.lower(): n for n in ("AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion", "Lion8bit", "Adafactor", "Prodigy")
}


def summary() -> str:
    """The counts README's "coming from kohya" section states, one line."""
    n = {a: sum(r.action == a for r in RULES.values()) for a in ("map", "note", "refuse")}
    return (
        f"{len(RULES)} keys of train_network.py / sdxl_train_network.py / flux_train_network.py: {n['map']} mapped "
        f"to lorafuse fields, {n['note']} accepted with no effect here, {n['refuse']} refused unless off"
    )


def markdown_table() -> str:
    """The mapping as README's "coming from kohya" table: one row per kohya key (same-name keys grouped)."""
    same = sorted(
        k for k, r in RULES.items() if r.action == "map" and not r.reason and r.target.endswith("." + k)
    )
    lines = ["| kohya key | lorafuse | how / why |", "| --- | --- | --- |"]
    by_table: dict[str, list[str]] = {}
    for key in same:
        by_table.setdefault(RULES[key].target.split(".")[0], []).append(key)
    for table, keys in by_table.items():
        lines.append(f"| {', '.join(f'`{k}`' for k in keys)} | `[{table}]`, same name | mapped |")
    for action, label in (("map", "mapped"), ("note", "no effect here"), ("refuse", "refused unless off")):
        for key in sorted(k for k, r in RULES.items() if r.action == action and k not in same):
            rule = RULES[key]
            where = f"`{rule.target}`" if action == "map" else label
            lines.append(f"| `{key}` | {where} | {rule.reason} |")
    return "\n".join(lines)
