"""A base's modules built on the meta device from its configs: shapes and parameter counts, no weights read.

`meta_components(name_or_path)` answers "how big is this base?" before anything loads (the memory estimate of
`lorafuse train --estimate`, the fit check before a CUDA run). Built-in names are built by their own builders
(a few MB) and moved there; a diffusers folder from `model_index.json` and each component's config; a single-file
checkpoint from its family's released configs (its keys tell the family); `reference:FAMILY` is the
released architecture of a family (`families`), for planning before a download.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

from lorafuse.errors import UserInputError
from lorafuse.families import family_of_checkpoint, get_family

REFERENCE_PREFIX = "reference:"
# The SD1.5 / SDXL VAE (runwayml/stable-diffusion-v1-5 vae/config.json); the families hold only what LoRAs target
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, sample_size=512,
)  # fmt: skip


def meta_components(name_or_path: str) -> dict[str, nn.Module]:
    """{component: module on the meta device} of a base (denoiser, text encoders, VAE). Raises `UserInputError`
    when the base's architecture cannot be told without loading it."""
    from lorafuse.models.load import BUILTIN_BASES, base_folder, tiny_base, world_random_pipeline

    if name_or_path.startswith(REFERENCE_PREFIX):
        return reference_components(name_or_path[len(REFERENCE_PREFIX) :])
    if name_or_path in BUILTIN_BASES:
        # Built for real (a few MB; their schedulers cannot be built on meta), then moved there. The world base's
        # trained weights share the random one's architecture.
        with torch.random.fork_rng(devices=[]):
            pipe = world_random_pipeline() if name_or_path.startswith("world") else tiny_base(name_or_path)
        return {k: v.to("meta") for k, v in pipe.components.items() if isinstance(v, nn.Module)}
    folder = base_folder(name_or_path)
    if folder is not None and (folder / "model_index.json").is_file():
        return _from_folder(folder)
    path = Path(name_or_path).expanduser()
    from lorafuse.models.flux_files import SAFETENSORS_SUFFIXES
    from lorafuse.models.load import base_spec

    if path.is_file() and path.suffix.lower() == ".toml":  # a TOML naming the base's files: sized by its main file
        return meta_components(base_spec(path)[0])
    if path.is_file() and path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        return reference_components(family_of_checkpoint(keys, str(path)).name)
    raise UserInputError(
        f"{name_or_path}: cannot tell the architecture without loading it (not a built-in name, a diffusers "
        "folder or a .safetensors checkpoint); give reference:sd15, reference:sdxl or reference:flux instead"
    )


def reference_components(family_name: str) -> dict[str, nn.Module]:
    """The released architecture of a family on the meta device, with its VAE."""
    from diffusers import AutoencoderKL

    family = get_family(family_name)
    comps = dict(family.reference_components())
    # a family module that knows its VAE says so (FLUX.1's 16-channel one); the SD families share SD_VAE
    vae = getattr(sys.modules[type(family).__module__], "VAE", SD_VAE)
    with torch.device("meta"):
        comps["vae"] = AutoencoderKL(**vae)
    return comps


def _from_folder(folder: Path) -> dict[str, nn.Module]:
    """Each torch component of a diffusers folder, from its config file alone (weights stay on disk)."""
    index = json.loads((folder / "model_index.json").read_text())
    out: dict[str, nn.Module] = {}
    for name, spec in index.items():
        if not (isinstance(spec, list) and len(spec) == 2 and spec[0] in ("diffusers", "transformers")):
            continue
        cls = getattr(importlib.import_module(spec[0]), spec[1], None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or not (folder / name).is_dir():
            continue
        with torch.device("meta"):
            if spec[0] == "diffusers":
                out[name] = cls.from_config(cls.load_config(folder / name))
            else:
                from transformers import AutoConfig

                out[name] = cls(AutoConfig.from_pretrained(folder / name))
    return out


# the largest default image side of the families (SDXL, FLUX.1): the size assumed for a base not readable here
LARGEST_SIDE = 1024


def sample_side(name_or_path: str) -> int:
    """The default image side in pixels a base samples at, from its configs (for disk-space estimates before
    it loads); `LARGEST_SIDE` when its architecture cannot be read without loading it."""
    from types import SimpleNamespace

    from lorafuse.families import family_of

    try:
        comps = meta_components(name_or_path)
    except UserInputError:
        return LARGEST_SIDE
    # what `Family.sample_size` reads of a pipeline: its components and the VAE's downsampling factor
    factor = 2 ** (len(comps["vae"].config.block_out_channels) - 1)
    return family_of(comps).sample_size(SimpleNamespace(**comps, vae_scale_factor=factor))
