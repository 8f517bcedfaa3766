"""Cached VAE latents and text-encoder outputs, in memory or on disk as safetensors.

A cache entry is valid only for the exact inputs that made it: its key hashes the image bytes, the bucket,
resize and crop, and a fingerprint of the VAE weights (for text: the caption, the text-encoder and tokenizer
fingerprints and clip_skip). A file whose key differs is stale and recomputed, so editing an image, changing the
resolution or swapping the VAE never trains on old latents. Disk files go beside the images, as kohya's .npz,
or in `cache_dir`; every write is atomic, so an interrupted caching run leaves no half file.

Latents are stored unscaled and as the posterior mean (`latent_dist.mode()`): deterministic, so a resumed run
matches an uninterrupted one; the training loop normalises them with the family's `normalize_latents`
((z - shift_factor) * scaling_factor).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lorafuse.errors import UserInputError
from lorafuse.families import Family, get_family
from lorafuse.train.buckets import crop_offset
from lorafuse.train.data import DatasetIndex, ImageItem, image_tensor
from lorafuse.train.masks import mask_pixels
from lorafuse.utils.atomic import atomic_path, safetensors_bytes_to

log = logging.getLogger(__name__)

CACHE_VERSION = "1"  # bump when what a cache file holds changes meaning
_FLIP_NAMES = {False: "latents", True: "latents_flipped"}


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def module_fingerprint(*modules: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes): changes with any weight or dtype."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _key(**parts: object) -> str:
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True).encode()).hexdigest()


def _cache_file(image: Path, cache_dir: Path | None, kind: str) -> Path:
    # The full image name, not kohya's stem: 001.png and 001.jpg in one folder must not share a file.
    if cache_dir is None:
        return image.with_name(f"{image.name}.{kind}.safetensors")
    # One flat folder for all datasets: prefix a hash of the source folder so equal stems do not collide.
    folder_id = hashlib.sha1(str(image.parent.resolve()).encode()).hexdigest()[:12]
    return cache_dir / f"{folder_id}_{image.name}.{kind}.safetensors"


def _read_valid(path: Path, key: str, names: Sequence[str]) -> bool:
    """True if `path` holds `names` under `key`; a missing, stale or unreadable file is False."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return meta.get("lorafuse_cache_key") == key and set(names) <= set(f.keys())
    except (OSError, SafetensorError):
        return False


def _write(path: Path, tensors: dict[str, torch.Tensor], key: str) -> None:
    with atomic_path(path) as tmp:
        safetensors_bytes_to(
            tmp, tensors, {"lorafuse_cache_key": key, "lorafuse_cache_version": CACHE_VERSION}
        )


@dataclass
class CacheStats:
    computed: int = 0  # entries (images or captions) encoded in this call
    reused: int = 0  # entries found valid in memory or on disk


class _Store:
    """Entries of one item each: tensors by name, held in memory or in one safetensors file per image."""

    def __init__(self, kind: str, to_disk: bool, cache_dir: Path | None):
        self.kind, self.to_disk, self.cache_dir = kind, to_disk, cache_dir
        self.keys: dict[int, str] = {}
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        self.files: dict[int, Path] = {}

    def valid(self, idx: int, item: ImageItem, key: str, names: Sequence[str]) -> bool:
        self.keys[idx] = key
        if self.to_disk:
            self.files[idx] = _cache_file(item.path, self.cache_dir, self.kind)
            return _read_valid(self.files[idx], key, names)
        return key in self.memory and set(names) <= set(self.memory[key])

    def put(self, idx: int, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        if self.to_disk:
            _write(self.files[idx], tensors, self.keys[idx])
        else:
            self.memory[self.keys[idx]] = tensors

    def get(self, idx: int, name: str | None = None) -> dict[str, torch.Tensor]:
        if idx not in self.keys:
            raise KeyError(
                f"item {idx} is not in this {self.kind} cache; call prepare() with its dataset first"
            )
        if self.to_disk:
            path = self.files[idx]
            with safe_open(str(path), framework="pt") as f:
                # Another run (another VAE, another resolution) may have rewritten the file since prepare().
                if (f.metadata() or {}).get("lorafuse_cache_key") != self.keys[idx]:
                    raise UserInputError(
                        f"{path}: cache file changed since prepare() (another run rewrote it?); "
                        "give concurrent runs separate cache_dir folders, or call prepare() again"
                    )
                names = f.keys() if name is None else [name]
                return {n: f.get_tensor(n) for n in names}
        tensors = self.memory[self.keys[idx]]
        return tensors if name is None else {name: tensors[name]}


@torch.no_grad()
def encode_latents(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8) unscaled posterior mean."""
    param = next(vae.parameters())
    return vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode().float()


class LatentCache:
    """Latents for every (item, flip) a `TrainDataset` can ask for: only the center crop is cached, which is why
    `random_crop` and `cache_latents` exclude each other in `DatasetConfig`."""

    def __init__(
        self, vae: nn.Module, *, to_disk: bool = False, cache_dir: Path | None = None, batch_size: int = 4
    ):
        self.vae, self.batch_size = vae, batch_size
        self.vae_fingerprint = module_fingerprint(vae)
        self.store = _Store("latents", to_disk, cache_dir)

    def item_key(self, item: ImageItem) -> str:
        a = item.assignment
        # the loss mask is cached with the latents: its source is part of the key (absent without one, so
        # caches of unmasked images stay valid)
        mask = (
            {} if item.mask is None else {"mask": "alpha" if item.mask == "alpha" else file_digest(item.mask)}
        )
        return _key(
            kind="latents",
            image=file_digest(item.path),
            bucket=a.bucket,
            resized=a.resized,
            crop=crop_offset(a.resized, a.bucket, None),
            vae=self.vae_fingerprint,
            **mask,
        )

    def release_vae(self) -> None:
        """Forget the VAE once `prepare` has run: `get` reads only the stored entries, and the training loop drops
        the encoder it no longer calls. A later `prepare` needs a new cache."""
        self.vae = None

    def prepare(self, index: DatasetIndex) -> CacheStats:
        """Reuse valid entries, encode the missing and stale ones (batched per bucket); returns the counts."""
        if self.vae is None:
            raise RuntimeError("LatentCache.prepare after release_vae(): make a new cache with the VAE")
        stats, todo = CacheStats(), []
        for idx, item in enumerate(index.items):
            if item.repeats == 0:
                continue  # a reg image the balancing left out is never asked for
            names = [_FLIP_NAMES[f] for f in self._flips(index, item)] + (["mask"] if item.mask else [])
            if self.store.valid(idx, item, self.item_key(item), names):
                stats.reused += 1
            else:
                todo.append(idx)
        groups: dict[tuple, list[int]] = {}
        for i in todo:  # one bucket per batch: images of a bucket share a shape
            item = index.items[i]
            groups.setdefault((item.assignment.bucket, self._flips(index, item)), []).append(i)
        for (_, flips), ids in groups.items():
            for start in range(0, len(ids), self.batch_size):
                self._encode(index, ids[start : start + self.batch_size], flips)
        stats.computed = len(todo)
        log.info("latent cache: %d encoded, %d reused", stats.computed, stats.reused)
        return stats

    @staticmethod
    def _flips(index: DatasetIndex, item: ImageItem) -> tuple[bool, ...]:
        # flip_aug may differ per subset (kohya's dataset_config)
        return (False, True) if index.augments[item.subset].flip_aug else (False,)

    def _encode(self, index: DatasetIndex, chunk: list[int], flips: Sequence[bool]) -> None:
        per_item: dict[int, dict[str, torch.Tensor]] = {i: {} for i in chunk}
        for flip in flips:
            pixels = torch.stack([image_tensor(index.items[i], flip, None)[0] for i in chunk])  # (B, 3, H, W)
            for i, latent in zip(chunk, encode_latents(self.vae, pixels), strict=True):
                per_item[i][_FLIP_NAMES[flip]] = latent
        for i in chunk:  # the unflipped centre-crop mask (H, W) uint8; get_mask flips it
            item = index.items[i]
            if item.mask is not None:
                per_item[i]["mask"] = mask_pixels(
                    item, False, crop_offset(item.assignment.resized, item.assignment.bucket, None)
                )
        for i, tensors in per_item.items():
            self.store.put(i, tensors)

    def get(self, item_index: int, flip: bool) -> torch.Tensor:
        """(4, h, w) unscaled latents of one item."""
        name = _FLIP_NAMES[flip]
        return self.store.get(item_index, name)[name]

    def get_mask(self, item_index: int, flip: bool) -> torch.Tensor:
        """(H, W) uint8 loss mask of one item, at its bucket size (train/masks.py)."""
        mask = self.store.get(item_index, "mask")["mask"]
        return mask.flip(-1) if flip else mask


def _tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, tokenizer.model_max_length]).encode()).hexdigest()


@torch.no_grad()
def encode_text(
    tokenizers: Sequence,
    text_encoders: Sequence[nn.Module],
    captions: list[str],
    clip_skip: int = 1,
    max_token_length: int | None = None,
    **family_options,
) -> dict[str, torch.Tensor]:
    """`text_embeddings` without autograd: for caches and frozen text encoders."""
    return text_embeddings(tokenizers, text_encoders, captions, clip_skip, max_token_length, **family_options)


def text_embeddings(
    tokenizers: Sequence,
    text_encoders: Sequence[nn.Module],
    captions: list[str],
    clip_skip: int = 1,
    max_token_length: int | None = None,
    *,
    family: Family | str = "sd15",
    t5_max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Prompt embeddings as the family's denoiser gets them in training (`Family.training_text`); differentiable,
    so a trained text-encoder LoRA and the cache share one definition. SD1.5, SDXL and the world base encode
    alike (the number of encoders decides), hence the default family."""
    return get_family(family).training_text(
        tokenizers, text_encoders, captions, clip_skip=clip_skip, max_token_length=max_token_length,
        t5_max_length=t5_max_length,
    )  # fmt: skip


class TextEncoderCache:
    """Text-encoder outputs of each item's fixed caption, for runs that do not train the text encoder.

    Valid only while captions do not change between epochs (no shuffle or dropout): `TrainConfig` checks that.
    """

    def __init__(
        self,
        tokenizers: Sequence,
        text_encoders: Sequence[nn.Module],
        clip_skip: int = 1,
        *,
        to_disk: bool = False,
        cache_dir: Path | None = None,
        batch_size: int = 8,
        max_token_length: int | None = None,
        family: Family | str = "sd15",
        t5_max_length: int | None = None,
    ):
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.clip_skip, self.batch_size = clip_skip, batch_size
        self.max_token_length = max_token_length
        self.family = get_family(family)
        self.t5_max_length = t5_max_length
        self.fingerprint = _key(
            kind="text",
            te=module_fingerprint(*self.text_encoders),
            clip_skip=clip_skip,
            **({"max_token_length": max_token_length} if max_token_length else {}),
            **({"t5_max_length": t5_max_length} if t5_max_length else {}),
            tok=[_tokenizer_fingerprint(t) for t in self.tokenizers],
        )
        self.store = _Store("te", to_disk, cache_dir)

    def release_encoders(self) -> None:
        """Forget the text encoders once `prepare` has run (see `LatentCache.release_vae`)."""
        self.text_encoders = []

    def prepare(self, index: DatasetIndex) -> CacheStats:
        """Reuse valid entries; encode the rest, each distinct caption once."""
        if not self.text_encoders:
            raise RuntimeError("TextEncoderCache.prepare after release_encoders(): make a new cache")
        stats, todo = CacheStats(), {}
        for idx, item in enumerate(index.items):
            if item.repeats == 0:
                continue
            key = _key(kind="text", caption=item.caption, encoders=self.fingerprint)
            if self.store.valid(idx, item, key, ["encoder_hidden_states"]):
                stats.reused += 1
            else:
                todo.setdefault(item.caption, []).append(idx)
        captions = list(todo)
        for start in range(0, len(captions), self.batch_size):
            chunk = captions[start : start + self.batch_size]
            encoded = encode_text(
                self.tokenizers, self.text_encoders, chunk, self.clip_skip, self.max_token_length,
                family=self.family, t5_max_length=self.t5_max_length,
            )  # fmt: skip
            for j, caption in enumerate(chunk):
                for idx in todo[caption]:
                    self.store.put(idx, {name: t[j] for name, t in encoded.items()})
                    stats.computed += 1
        log.info("text-encoder cache: %d encoded, %d reused", stats.computed, stats.reused)
        return stats

    def get(self, item_index: int) -> dict[str, torch.Tensor]:
        return self.store.get(item_index)
