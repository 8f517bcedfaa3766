"""A `FluxPipeline` assembled offline from FLUX.1's separate files, as kohya's flux_train_network.py users
(`pretrained_model_name_or_path`, `ae`, `clip_l`, `t5xxl`) and ComfyUI users keep them.

The configs come from a diffusers FLUX.1 folder when one is given (`model.tokenizers`: its `tokenizer/` and
`tokenizer_2/` are needed, its `<component>/config.json` files are used where present, weights are not), else
from FLUX.1's released configs (`families/flux.py`). The transformer's depth, width and variant (dev has a
guidance embedding, schnell none) are read from its keys, as kohya does, so pruned models load too. Without a
folder the tokenizers are the standard hub ones, from the local Hugging Face cache only.

Order: every file's header is read, identified and converted on the meta device and checked against the model it
goes into before any weight is read, so a wrong or truncated file fails in a second with one error naming it.
The weights are then read and cast to the chosen dtype (fp8-stored files are upcast).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafuse.errors import UserInputError
from lorafuse.families.flux import SCHEDULER_DEV, SCHEDULER_SCHNELL, T5_XXL, TRANSFORMER, VAE
from lorafuse.families.sd15 import CLIP_L
from lorafuse.models import flux_files as ff

DEFAULT_TOKENIZERS = ("openai/clip-vit-large-patch14", "google/t5-v1_1-xxl")  # FLUX.1's, from the cache only
BASE_OPTION = "pretrained_model_name_or_path"
# option -> (what the file must hold, the pipeline component it becomes)
PARTS = {BASE_OPTION: ("transformer", "transformer"), "ae": ("vae", "vae"), "clip_l": ("clip", "text_encoder"),
         "t5xxl": ("t5", "text_encoder_2")}  # fmt: skip
_HINT = (
    "Its sizes differ from the config used ({source}); set model.tokenizers to a diffusers FLUX.1 folder whose "
    "{sub}/config.json describes this file"
)


def load_flux_parts(
    transformer: str | Path, parts: Mapping[str, str | Path], *, tokenizers: str | None = None,
    dtype: torch.dtype | None = None,
) -> Any:  # fmt: skip
    """The FluxPipeline of the transformer file and its `parts` (`ae`, `clip_l`, `t5xxl` paths; all three needed).

    tokenizers: a diffusers FLUX.1 folder or Hugging Face cache id (see the module docstring); dtype: the weights'
    dtype (None: float32)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    missing = [p for p in PARTS if p != BASE_OPTION and not parts.get(p)]
    unknown = sorted(set(parts) - set(PARTS))
    if missing or unknown:
        problems = [f"{what}: {', '.join(names)}" for what, names in (("missing", missing), ("unknown", unknown)) if names]
        raise UserInputError(
            f"{transformer}: a FLUX.1 transformer file needs model.ae, model.clip_l and model.t5xxl beside it "
            f"(kohya's ae / clip_l / t5xxl); {'; '.join(problems)}"
        )
    # 1. every file there, readable and holding the component its option names (headers only)
    paths = {
        BASE_OPTION: Path(transformer).expanduser(),
        **{k: Path(v).expanduser() for k, v in parts.items()},
    }
    shapes = {}
    for option, (kind, _) in PARTS.items():
        shapes[option] = ff.read_shapes(paths[option], option)
        ff.check_kind(paths[option], option, shapes[option], kind)
    # 2. the configs, and each model built empty and checked against its converted file
    folder = _resolve_folder(tokenizers)
    models, converters = empty_models(paths, shapes, folder)
    # 3. the tokenizers (local files only), before the weights are read
    tokenizer, tokenizer_2 = _tokenizers(folder, tokenizers)
    _check_vocab({"clip_l": tokenizer, "t5xxl": tokenizer_2}, models, paths, tokenizers)
    # 4. the weights, cast to dtype
    dtype = dtype or torch.float32
    for option, (_, component) in PARTS.items():
        sd = converters[component](_read(paths[option], dtype))
        models[component].load_state_dict(sd, strict=True, assign=True)
        models[component].eval()  # the weights are already in dtype
    variant = SCHEDULER_DEV if models["transformer"].config.guidance_embeds else SCHEDULER_SCHNELL
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**variant),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        **models,
    )


def empty_models(
    paths: Mapping[str, Path], shapes: Mapping[str, Mapping[str, tuple[int, ...]]], folder: Path | None
) -> tuple[dict[str, nn.Module], dict[str, Convert]]:
    """{component: its model with empty weights}, {component: its file's key converter}, each file's converted
    header checked against its model (`shapes`: option -> {key: shape}, `read_shapes`)."""
    builders = _builders(folder, paths[BASE_OPTION])
    models, converters = {}, {}
    for option, (_, component) in PARTS.items():
        models[component], converters[component] = builders[component](_meta(shapes[option]))
        got = {k: tuple(v.shape) for k, v in converters[component](_meta(shapes[option])).items()}
        want = {k: tuple(v.shape) for k, v in models[component].state_dict().items()}
        given = folder is not None and (folder / component / "config.json").is_file()
        source = f"{folder / component / 'config.json'}" if given else f"FLUX.1's released {component} config"
        hint = _HINT.format(source=source, sub=component)
        ff.check_fits(paths[option], option, got, want, f"the {component} model", hint)
    return models, converters


def _check_vocab(tokenizers: Mapping[str, Any], models: Mapping[str, nn.Module], paths: Mapping[str, Path],
                 source: str | None) -> None:  # fmt: skip
    """Token ids past a text encoder's embedding rows would fail at the first prompt: another model's tokenizer."""
    for option, tok in tokenizers.items():
        rows = models[PARTS[option][1]].config.vocab_size  # the file's rows (checked against the config)
        if len(tok) > rows:
            raise UserInputError(
                f"the tokenizer for {option} ({paths[option]}) has {len(tok)} tokens, its embedding {rows} rows: "
                f"the tokenizers ({source or ' / '.join(DEFAULT_TOKENIZERS)}) are not this model's"
            )


def _meta(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def _read(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        # fp8 weights have no CPU matmul: upcast every tensor on load (kohya's fp8_base re-quantizes later)
        return {k: f.get_tensor(k).to(dtype) for k in f.keys()}  # noqa: SIM118 (not a dict)


Convert = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


def _builders(
    folder: Path | None, transformer_path: Path
) -> dict[str, Callable[[Mapping[str, torch.Tensor]], tuple[nn.Module, Convert]]]:
    """component -> (meta state dict of its file -> (the empty model, the file's key converter))."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    def transformer(sd):
        shapes = {k: tuple(v.shape) for k, v in ff.transformer_to_diffusers(sd).items()}
        config = {
            **(_config(folder, "transformer") or TRANSFORMER),
            **ff.transformer_sizes(shapes, transformer_path, BASE_OPTION),
        }
        if sum(config["axes_dims_rope"]) != config["attention_head_dim"]:
            raise UserInputError(
                f"{BASE_OPTION} = {transformer_path}: heads of width {config['attention_head_dim']}, but the RoPE axes "
                f"{tuple(config['axes_dims_rope'])} of the configs used sum to {sum(config['axes_dims_rope'])}; set "
                "model.tokenizers to a diffusers FLUX.1 folder whose transformer/config.json describes this model"
            )
        with init_empty_weights():
            return FluxTransformer2DModel.from_config(config), ff.transformer_to_diffusers

    def vae(sd):
        config = _config(folder, "vae") or VAE
        with init_empty_weights():
            return AutoencoderKL.from_config(config), lambda s: ff.vae_to_diffusers(s, config)

    def clip(sd):
        config = _config(folder, "text_encoder")
        with init_empty_weights():
            model = CLIPTextModel(CLIPTextConfig.from_dict(config) if config else CLIPTextConfig(**CLIP_L))
        keys = list(model.state_dict())
        return model, lambda s: ff.clip_to_transformers(s, keys)

    def t5(sd):
        config = _config(folder, "text_encoder_2")
        with init_empty_weights():
            return T5EncoderModel(
                T5Config.from_dict(config) if config else T5Config(**T5_XXL)
            ), ff.t5_to_transformers

    return {"transformer": transformer, "vae": vae, "text_encoder": clip, "text_encoder_2": t5}


def _config(folder: Path | None, sub: str) -> dict | None:
    path = None if folder is None else folder / sub / "config.json"
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def _resolve_folder(source: str | None) -> Path | None:
    """model.tokenizers: a folder as is; "owner/name" as its snapshot in the local Hugging Face cache."""
    if source is None:
        return None
    path = Path(source).expanduser()
    is_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    folder = _local_snapshot(path if path.is_dir() or not is_id else source)
    if folder is None:
        raise UserInputError(
            f"model.tokenizers = {source}: no such folder"
            + (", and not in the local Hugging Face cache (lorafuse never downloads)" if is_id else "")
        )
    return folder


_TOKENIZER_FILES = (("tokenizer.json", "vocab.json"), ("tokenizer.json", "spiece.model"))  # CLIP, T5: any of


def _local_snapshot(name: str | Path) -> Path | None:
    """A folder as is; a Hugging Face repo id as its snapshot in the local cache; None if neither."""
    if Path(name).is_dir():
        return Path(name)
    if isinstance(name, Path):
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # hub errors come in many types; all mean "not in the local cache"
        return None


def _tokenizers(folder: Path | None, source: str | None) -> tuple[Any, Any]:
    """CLIP-L's and T5's tokenizers: from the folder's tokenizer/ and tokenizer_2/, else the hub ids' cached
    copies; one error naming everything missing."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    # FluxPipeline's own classes (AutoTokenizer would also need the model's config.json, which a copy of only the
    # tokenizer files lacks), from a folder checked first: transformers 5 builds an empty tokenizer, silently,
    # when the files are not there
    where = [folder / "tokenizer", folder / "tokenizer_2"] if folder else list(DEFAULT_TOKENIZERS)
    found, missing = [], []
    for cls, name, files in zip((CLIPTokenizer, T5TokenizerFast), where, _TOKENIZER_FILES, strict=True):
        path = _local_snapshot(name)
        if path is None or not any((path / f).is_file() for f in files):
            missing.append(f"{name} (no {' / '.join(files)})")
            continue
        only_spm = (path / "spiece.model").is_file() and not (path / "tokenizer.json").is_file()
        if only_spm and importlib.util.find_spec("sentencepiece") is None:
            # google/t5-v1_1-xxl ships only spiece.model; transformers then blames a missing tiktoken
            missing.append(f"{name} (only spiece.model, which needs: pip install sentencepiece protobuf)")
            continue
        try:
            found.append(cls.from_pretrained(path, local_files_only=True))
        except Exception as e:  # OSError, ValueError: a broken copy
            missing.append(f"{name} ({type(e).__name__}: {e})")
    if missing:
        fix = (
            f"model.tokenizers = {source} must hold a diffusers FLUX.1 folder's tokenizer/ and tokenizer_2/"
            if folder
            else "set model.tokenizers to a diffusers FLUX.1 folder or cache id (its tokenizer/ and tokenizer_2/ "
            "suffice), or put the hub tokenizers into the local cache once (huggingface-cli download "
            f"{' / '.join(DEFAULT_TOKENIZERS)})"
        )
        raise UserInputError(
            f"the FLUX.1 tokenizers are not available offline: missing {', '.join(missing)}. lorafuse never "
            f"downloads: {fix}"
        )
    return found[0], found[1]
