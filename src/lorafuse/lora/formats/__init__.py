"""LoRA file formats: one module per family, and the detector that picks one from the keys."""

from __future__ import annotations

import re

from lorafuse.errors import LoraFormatError
from lorafuse.lora.formats import bfl, diffusers, kohya
from lorafuse.lora.formats.common import DAMAGED

READ_FAMILIES = ("kohya", "bfl", "diffusers")
WRITE_FORMATS = ("kohya", "diffusers")

_NOT_LORA = (
    (
        ("model.diffusion_model.", "first_stage_model.", "conditioner.", "cond_stage_model."),
        "a full Stable Diffusion checkpoint",
    ),
    (("emb_params", "string_to_param", "clip_l", "clip_g"), "a textual-inversion embedding"),
)


_LORA_WORDS = re.compile(r"lora|hada_|lokr_|alpha|dora|oft_", re.IGNORECASE)
_PLAIN = (".weight", ".bias", "running_mean", "running_var", "num_batches_tracked", "position_ids")


def detect_format(keys: list[str], source: str) -> str:
    """'kohya' (kohya and LyCORIS), 'bfl' (FLUX.1 ComfyUI / BFL / XLabs) or 'diffusers' (attention-processor,
    diffusers, PEFT); else a clear error. BFL names are tried before diffusers: PEFT's `<module>.lora_A.weight`
    pattern would also match `double_blocks.0.img_attn.qkv.lora_A.weight`."""
    if not keys:
        raise LoraFormatError(f"{source}: the file holds no tensors (an empty LoRA); {DAMAGED}")
    n_kohya = sum(kohya.is_kohya_key(k) for k in keys)
    if n_kohya == len(keys):
        return "kohya"
    if all(bfl.is_bfl_key(k) for k in keys):
        return "bfl"
    n_diffusers = sum(diffusers.is_diffusers_key(k) for k in keys)
    if n_diffusers == len(keys):
        return "diffusers"
    if n_kohya and n_kohya + n_diffusers == len(keys):
        return _two_schemes(keys, source)
    what = next((w for prefixes, w in _NOT_LORA if sum(k.startswith(prefixes) for k in keys) > len(keys) // 2), None)
    if what is None and not any(_LORA_WORDS.search(k) for k in keys) and all(k.endswith(_PLAIN) for k in keys):
        what = "the weights of a whole model (a base model or one of its parts: no key names a LoRA factor)"
    if what is not None:
        use = "a base model goes in --base / pretrained_model_name_or_path" if "embedding" not in what else ""
        raise LoraFormatError(
            f"{source}: this looks like {what}, not a LoRA (e.g. key {keys[0]!r}); give a LoRA file here"
            + (f" ({use})" if use else "")
        )
    family, n = ("kohya", n_kohya) if n_kohya >= n_diffusers else ("diffusers", n_diffusers)
    is_family = kohya.is_kohya_key if family == "kohya" else diffusers.is_diffusers_key
    unknown = [k for k in keys if not is_family(k)]
    hint = f" The other {n} keys look like the {family} format." if n else ""
    raise LoraFormatError(
        f"{source}: {len(unknown)} of {len(keys)} keys are in no LoRA format lorafuse reads, e.g. "
        f"{', '.join(repr(k) for k in unknown[:3])}.{hint} Readable: kohya / LyCORIS "
        "(`lora_unet_<module>.lora_down.weight`, `lora_te_…`), diffusers (`unet.<module>.lora.down.weight`, "
        "`….processor.to_q_lora.down.weight`), PEFT (`unet.<module>.lora_A.weight`, "
        "`transformer.<module>.lora_A.weight`) and FLUX.1 ComfyUI / XLabs "
        "(`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`, `double_blocks.0.processor.qkv_lora1.down.weight`)."
    )


def _two_schemes(keys: list[str], source: str) -> str:
    """Every key is kohya or diffusers, but both occur: a file merged or converted half-way."""
    kohya_keys = [k for k in keys if kohya.is_kohya_key(k)]
    other = [k for k in keys if not kohya.is_kohya_key(k)]
    raise LoraFormatError(
        f"{source}: the file mixes two LoRA naming schemes, {len(kohya_keys)} kohya keys (e.g. {kohya_keys[0]!r}) "
        f"and {len(other)} diffusers/PEFT keys (e.g. {other[0]!r}), so modules may be stored twice and applied "
        "twice. Keep one scheme: re-export the LoRA, or convert each part with `lorafuse convert` and merge them."
    )
