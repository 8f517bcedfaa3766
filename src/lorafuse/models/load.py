"""Load a base model for training or sampling: a diffusers folder, a single-file checkpoint, or a built-in name.

Names, checked in this order:
    world         the built-in world base model (models/world.py); while its trained weights are not
                  installed, the same architecture with fixed random weights, with a warning
    world-random  always that random-weight world pipeline (tests, benchmarks: independent of shipped weights)
    sd15-tiny, sdxl-tiny, flux-tiny, flux-schnell-tiny
                  tiny random-weight SD1.5 / SDXL / FLUX.1 dev / schnell pipelines (models/tiny*.py)
    a folder with model_index.json    `DiffusionPipeline.from_pretrained`
    a .safetensors file               `StableDiffusion(XL)Pipeline.from_single_file`; with separate part files
                                      (FLUX.1's ae, clip_l, t5xxl) the family's `parts_loader` assembles it
    "owner/name"                      a Hugging Face repo id, from the local cache only (nothing downloads)
    a .toml file                      its pretrained_model_name_or_path with the part files beside it (`base_spec`:
                                      a kohya FLUX.1 config or a lorafuse training config), so every --base can
                                      name FLUX.1's separate files
Nothing here downloads: `from_single_file` needs the model's diffusers config, which diffusers takes from the
local Hugging Face cache; without it the error says how to convert the checkpoint to a folder instead.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from lorafuse.errors import UserInputError
from lorafuse.families import FAMILIES, family_of_checkpoint
from lorafuse.utils.devices import resolve_device, resolve_dtype

# tiny random-weight bases by name -> (module in models/, builder): each family registers its own (`tiny_bases`)
TINY_BASES = {
    name: tuple(spec.split(":")) for family in FAMILIES.values() for name, spec in family.tiny_bases.items()
}

log = logging.getLogger(__name__)

BUILTIN_BASES = ("world", "world-random", *TINY_BASES)
WORLD_RANDOM_SEED = 0


def world_random_pipeline(seed: int = WORLD_RANDOM_SEED):
    """The built-in world architecture with seeded random weights (the same weights for the same seed)."""
    from diffusers import StableDiffusionPipeline

    from lorafuse.models.world import fresh_components, world_tokenizer

    with tempfile.TemporaryDirectory(prefix="lorafuse-world-tok-") as tmp:
        tokenizer = world_tokenizer(tmp)  # the tokenizer reads its files once; the folder may go
    with torch.random.fork_rng(devices=[]):  # building a base must not shift the caller's random stream
        torch.manual_seed(seed)
        comps = fresh_components(tokenizer)
    for name in ("vae", "unet", "text_encoder"):
        comps[name].eval()  # as from_pretrained leaves them
    return StableDiffusionPipeline(
        **comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def _world_pipeline():
    from lorafuse.models.world import default_base_path, load_world_pipeline

    if (default_base_path() / "model_index.json").is_file():
        return load_world_pipeline()
    log.warning(
        "the built-in world base model's trained weights are not installed (%s): using the world "
        "architecture with random weights, which is fine for testing the pipeline but learns nothing useful",
        default_base_path(),
    )
    return world_random_pipeline()


def _single_file(path: Path, dtype_kw: dict):
    import diffusers
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise UserInputError(f"{path}: not a readable safetensors checkpoint: {e}") from e
    family = family_of_checkpoint(keys, str(path))
    cls = getattr(diffusers, family.pipeline_class)
    try:
        return cls.from_single_file(str(path), local_files_only=True, **dtype_kw)
    except (
        Exception
    ) as e:  # diffusers raises several types here; all mean "cannot build the pipeline offline"
        separate = (
            f"; if the file holds only the {family.denoiser_component}, give its separate files as "
            + ", ".join(f"model.{p}" for p in family.part_files)
            if family.part_files
            else ""
        )
        raise UserInputError(
            f"{path}: from_single_file could not build a {family.label} pipeline offline ({e}). "
            "It needs the model's diffusers config from the local Hugging Face cache; alternatively convert the "
            f"checkpoint once to a diffusers folder (pipe.save_pretrained) and train on that folder{separate}."
        ) from e


def _from_parts(name_or_path: str, parts: Mapping[str, str], tokenizers: str | None, dtype: torch.dtype | None):
    """A single-file checkpoint with its separate component files, assembled by its family's `parts_loader`."""
    import importlib

    from lorafuse.models.flux_files import read_shapes

    path = Path(name_or_path).expanduser()
    given = ", ".join(f"model.{p}" for p in parts)
    if not path.is_file():
        raise UserInputError(
            f"{name_or_path}: {given} go with a single-file checkpoint as pretrained_model_name_or_path, and there "
            "is no such file"
        )
    family = family_of_checkpoint(list(read_shapes(path, "pretrained_model_name_or_path")), str(path))
    if not family.part_files:
        takes = [f.label for f in FAMILIES.values() if f.part_files]
        raise UserInputError(
            f"{path}: a checkpoint of the {family.label} family, but {given} are the separate files of "
            f"{' / '.join(takes)} bases; a {family.label} checkpoint holds its own VAE and text encoders (leave "
            "them out)"
        )
    module, function = family.parts_loader.split(":")
    loader = getattr(importlib.import_module(f"lorafuse.models.{module}"), function)
    return loader(path, parts, tokenizers=tokenizers, dtype=dtype)


def base_spec(path: Path) -> tuple[str, dict[str, str], str | None]:
    """(base, parts, tokenizers) of a TOML file that stands for a base: its `pretrained_model_name_or_path` with
    the separate part files and `tokenizers`, at the top level (kohya's flat config) or in [model] (a lorafuse
    training config); other keys are not read. Relative paths are taken from the working folder, as training
    takes them."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserInputError(f"{path}: not a readable TOML file ({e})") from e
    table = data["model"] if isinstance(data.get("model"), dict) else data
    base = table.get("pretrained_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise UserInputError(
            f"{path}: a base given as a TOML file needs pretrained_model_name_or_path (at the top level, as kohya "
            "writes it, or in [model])"
        )
    names = sorted({name for family in FAMILIES.values() for name in family.part_files})
    tokenizers = table.get("tokenizers")
    return base, {k: str(table[k]) for k in names if table.get(k)}, None if tokenizers is None else str(tokenizers)


def tiny_base(name: str, seed: int = 0):
    """A tiny random-weight pipeline by name (`TINY_BASES`)."""
    import importlib

    module, builder = TINY_BASES[name]  # imported on use: `lorafuse --help` must not pay for diffusers
    return getattr(importlib.import_module(f"lorafuse.models.{module}"), builder)(seed)


def load_base_pipeline(name_or_path: str, *, device: str | torch.device | None = None,
                       dtype: str | torch.dtype | None = None, parts: Mapping[str, str | None] | None = None,
                       tokenizers: str | None = None):  # fmt: skip
    """A diffusers pipeline for `name_or_path` (see the module docstring), progress bars off, modules in eval.

    device, dtype: where and in which precision its weights live ("cuda", "bf16", ...); None keeps the loaded
    default (fp32 on the CPU). Both are checked before anything loads.
    parts: the separate component files of a single-file checkpoint, by model config name (FLUX.1: "ae",
    "clip_l", "t5xxl"; None values are left out); tokenizers: where their loader finds tokenizers and configs."""
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    parts = {k: v for k, v in (parts or {}).items() if v}
    if not parts and name_or_path.lower().endswith(".toml") and Path(name_or_path).expanduser().is_file():
        name_or_path, parts, tokenizers = base_spec(Path(name_or_path).expanduser())
    with _no_load_bars():
        pipe = _load(name_or_path, dtype, parts, tokenizers)
    pipe.set_progress_bar_config(disable=True)
    return pipe if device is None else pipe.to(device)


def check_base_name(name_or_path: str) -> None:
    """The error `load_base_pipeline` would give for a base that does not exist, without loading anything
    (for `--dry-run` and grid plans). A hub id ("owner/name") is left to the loader: only it knows the cache."""
    if name_or_path in BUILTIN_BASES or Path(name_or_path).expanduser().exists():
        return
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        return
    raise UserInputError(
        f"{name_or_path}: no such file or folder; give a diffusers pipeline folder, a .safetensors checkpoint, "
        f"or one of {', '.join(BUILTIN_BASES)}"
    )


@contextlib.contextmanager
def _no_load_bars() -> Iterator[None]:
    """diffusers' "Loading pipeline components" and transformers' "Loading weights" bars would come before, and
    bury, a one-line error about the inputs (a LoRA that does not fit this base)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


def _load(name_or_path: str, dtype: torch.dtype | None, parts: Mapping[str, str], tokenizers: str | None):
    if parts:
        pipe = _from_parts(name_or_path, parts, tokenizers, dtype)
    elif name_or_path in BUILTIN_BASES:
        if name_or_path == "world":
            pipe = _world_pipeline()
        elif name_or_path == "world-random":
            pipe = world_random_pipeline()
        else:
            pipe = tiny_base(name_or_path)
        if dtype is not None:
            # diffusers warns about modules to keep in fp32 even when a model names none, as ours do
            with _quiet("diffusers.models.modeling_utils"):
                pipe.to(dtype=dtype)
    else:
        pipe = _from_path(name_or_path, {} if dtype is None else {"torch_dtype": dtype})
    return pipe


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def base_folder(name_or_path: str) -> Path | None:
    """The diffusers folder a base name or path stands for, when it has one ("world": the shipped model)."""
    if name_or_path == "world":
        from lorafuse.models.world import default_base_path

        return default_base_path()
    path = Path(name_or_path).expanduser()
    return path if path.is_dir() else None


def _no_safety_checker(model_index: Path) -> dict:
    """SD1.5 pipelines take safety_checker=None (training needs no NSFW filter); SDXL has no such argument."""
    import json

    index = json.loads(model_index.read_text())
    return {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".pth")


def _is_lfs_pointer(path: Path) -> bool:
    # a clone without git-lfs leaves a ~130-byte text file where the weights should be
    with open(path, "rb") as fh:
        return fh.read(40).startswith(b"version https://git-lfs")


# classes of model_index.json entries that hold no weights (their folders hold configs or vocabularies only)
_WEIGHTLESS = ("Tokenizer", "Scheduler", "FeatureExtractor", "ImageProcessor", "Processor")


def check_weights_present(folder: Path) -> None:
    """One clear error when a pipeline folder's models (unet, vae, text encoders, ...) have no weight files: a repo
    cloned without git-lfs, a copy of only the JSON files, or only model_index.json; diffusers would raise a raw
    OSError deep inside from_pretrained instead."""
    import json

    index = json.loads((folder / "model_index.json").read_text())
    missing = []
    for name, spec in sorted(index.items()):
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[1] is None:
            continue
        sub = folder / name
        if any(kind in str(spec[1]) for kind in _WEIGHTLESS):
            continue
        if not (sub / "config.json").is_file():
            missing.append(f"{name} (no {name}/ folder)" if not sub.is_dir() else f"{name} (no {name}/config.json)")
            continue
        files = [p for p in sub.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
        if not files:
            missing.append(name)
        elif all(_is_lfs_pointer(p) for p in files):
            missing.append(f"{name} (only git-lfs pointer files)")
    if missing:
        raise UserInputError(
            f"{folder}: the pipeline folder has no weights for {', '.join(missing)} (no "
            f"{'/'.join(WEIGHT_SUFFIXES)} files). Copy or download the weight files too (for a git clone: "
            "git lfs pull), or give a .safetensors checkpoint instead"
        )


def _from_path(name_or_path: str, dtype_kw: dict):
    from diffusers import DiffusionPipeline

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())[:6]) or "nothing"
            raise UserInputError(
                f"{path}: not a diffusers pipeline folder (no model_index.json; it holds {found}). Give a diffusers "
                f"folder, a .safetensors checkpoint file, or one of {', '.join(BUILTIN_BASES)}"
            )
        check_weights_present(path)
        return DiffusionPipeline.from_pretrained(path, **_no_safety_checker(path / "model_index.json"), **dtype_kw)
    if path.is_file():
        from lorafuse.models.flux_files import SAFETENSORS_SUFFIXES

        if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
            raise UserInputError(
                f"{path}: lorafuse loads single-file checkpoints as .safetensors only ({path.suffix} files are "
                "pickles that can run code when loaded); convert it to .safetensors first"
            )
        return _single_file(path, dtype_kw)
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        try:
            return DiffusionPipeline.from_pretrained(name_or_path, local_files_only=True, **dtype_kw)
        except Exception as e:  # hub errors come in many types; all mean "not in the local cache"
            raise UserInputError(
                f"{name_or_path}: no such folder, and not in the local Hugging Face cache (lorafuse never "
                f"downloads): {e}"
            ) from e
    raise UserInputError(
        f"{name_or_path}: no such file or folder; give a diffusers pipeline folder, a .safetensors checkpoint, "
        f"or one of {', '.join(BUILTIN_BASES)}"
    )
