"""Public API for LoRA files: `load_lora` and `save_lora`.

Safety: only safetensors by default. Pickle-based files (.ckpt/.pt/.bin/.pth) can run code when unpickled,
so they are refused unless the caller opts in with `allow_pickle=True`, and even then read with
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers. Every file we write goes
through `lorafuse.utils.atomic`: an interrupted save never leaves half a LoRA under the final name.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from lorafuse.errors import LoraFormatError, UserInputError
from lorafuse.families import FAMILIES, get_family
from lorafuse.lora.checks import check_magnitudes, check_tensors
from lorafuse.lora.formats import WRITE_FORMATS, bfl, detect_format, diffusers, kohya
from lorafuse.lora.formats.common import DAMAGED
from lorafuse.lora.formats.metadata import build_metadata, to_str
from lorafuse.lora.keys import ARCHS, KeyIndex, NameResolver, UnetLayout
from lorafuse.lora.state import LoraState
from lorafuse.utils.atomic import atomic_save_safetensors
from lorafuse.utils.inputs import check_input_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".bin", ".pth")


# What a file that does not start like a safetensors file (8-byte header length, then "{") really is: a
# renamed archive or a failed download deserves its own next step, not "corrupt".
_MAGIC = (
    (b"\x1f\x8b", "a gzip archive; unpack it (gunzip) and pass the .safetensors file inside"),
    (b"PK\x03\x04", "a zip archive (or a torch.save checkpoint); unzip it, or for a torch file rename it to .pt "
                    "and pass --allow-pickle"),
    (b"\x80", "a Python pickle (a .ckpt/.pt file renamed); rename it to .pt and pass --allow-pickle"),
    (b"version https://git-lfs", "a Git LFS pointer, not the file itself; run `git lfs pull` to fetch it"),
    (b"7z\xbc\xaf", "a 7-Zip archive; unpack it and pass the .safetensors file inside"),
    (b"Rar!", "a RAR archive; unpack it and pass the .safetensors file inside"),
    (b"\x89PNG", "a PNG image, not a LoRA"),
    (b"\xff\xd8\xff", "a JPEG image, not a LoRA"),
)
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


def _header_problem(path: Path) -> str | None:
    """Why `path` is not a well-formed safetensors file, checked before the library reads it, or None."""
    import json

    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        first = fh.read(min(n, _MAX_HEADER, 64))
    looks_right = len(head) == 8 and n <= _MAX_HEADER and first.startswith(b"{")
    for magic, what in _MAGIC if not looks_right else ():
        if (head + first).startswith(magic):
            return f"it is {what}"
    if not looks_right and (head + first).lstrip()[:1] == b"<":
        return "it is an HTML/XML page (a failed download?); download the file again"
    if len(head) < 8:
        return f"only {size} bytes, too short for a safetensors file; the file is empty or cut short, download or export it again"  # fmt: skip
    if not looks_right:
        return ("it does not start like one (an 8-byte header length, then a JSON header); it is another kind of "
                "file or damaged")  # fmt: skip
    if 8 + n > size:
        return (f"its header length field says {n} bytes follow, but the file has only {size - 8} more: it is cut "
                "short; download or export it again")  # fmt: skip
    with open(path, "rb") as fh:
        fh.seek(8)
        raw = fh.read(n)
    twice: list[str] = []

    def pairs(items: list) -> dict:  # json keeps the last of two equal keys without a word
        keys = [key for key, _ in items]
        twice.extend(sorted({key for key in keys if keys.count(key) > 1}))
        return dict(items)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=pairs)
    except UnicodeDecodeError as e:
        return f"its header is not UTF-8 text (byte {e.start}); the file is damaged"
    except ValueError as e:
        return f"its header is not valid JSON ({e}); the file is damaged"
    if twice:
        return (f"its header lists tensor {twice[0]!r} twice, so one copy would silently replace the other; the "
                "file is damaged, export it again")  # fmt: skip
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
            and isinstance(v["data_offsets"][1], int)]  # fmt: skip
    if ends and 8 + n + max(ends) > size:
        return (f"cut short: its tensors need {8 + n + max(ends)} bytes but the file has {size}; download or export "
                "it again")  # fmt: skip
    return None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    problem = _header_problem(path)
    if problem is not None:
        raise LoraFormatError(f"{path}: not a readable safetensors file: {problem}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraFormatError(
            f"{path}: not a readable safetensors file: its header is inconsistent ({e}); the file is damaged, "
            "download or export it again"
        ) from e
    return tensors, metadata


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean "not a plain tensor file"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        # torch's message opens with advice to retry with weights_only=False, i.e. to run the file's code
        first = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0])
        first = first.removeprefix("WeightsUnpickler error: ")
        raise LoraFormatError(
            f"{path}: could not be read with torch.load(weights_only=True) (corrupt, or it holds objects other "
            f"than tensors, which may run code: {first}); convert it to .safetensors with the tool that wrote it"
        ) from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise LoraFormatError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors; {DAMAGED}")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise LoraFormatError(f"{path}: entries that are not named tensors, e.g. {bad[:3]}; {DAMAGED}")
    return dict(obj)


def _resolver(base: object | None) -> NameResolver:
    """Kohya names are resolved against the base's real module names, else against the reference archs."""
    from lorafuse.lora.targets import base_modules, reference_modules

    if base is not None:
        return NameResolver([base_modules(base).index])
    from lorafuse.lora.archs import REFERENCE_ARCHS

    # families whose kohya files use SGM UNet names first: an SGM block number names another module in another
    # UNet layout, so SDXL's names must not resolve against SD1.5's layout
    order = sorted(REFERENCE_ARCHS, key=lambda arch: not get_family(arch).kohya_sgm_unet)
    return NameResolver([reference_modules(arch).index for arch in order])


def read_tensors(path: str | os.PathLike, *, allow_pickle: bool = False) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a LoRA file, with the safety checks but no format interpretation."""
    path = check_input_file(path, "LoRA file", LoraFormatError)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoraFormatError(
                f"{path}: {suffix} files are Python pickles, which can run arbitrary code when loaded. "
                "lorafuse reads .safetensors only unless you opt in (allow_pickle=True / --allow-pickle); "
                "it then uses torch.load(weights_only=True). Better: convert the file to .safetensors."
            )
        tensors, metadata = _read_pickle(path), {}
    else:
        raise LoraFormatError(f"{path}: unknown LoRA file type {suffix!r}; expected .safetensors")
    # float8 (e4m3 / e5m2) factors: torch has no isfinite or matmul for them on CPU, and float16 holds every
    # float8 value exactly, so they are widened once here
    tensors = {k: v.half() if v.is_floating_point() and v.element_size() == 1 else v for k, v in tensors.items()}
    return check_tensors(tensors, str(path)), metadata


def load_lora(
    path: str | os.PathLike, *, allow_pickle: bool = False, base: object | None = None
) -> LoraState:
    """Read any supported LoRA file into the canonical `LoraState`.

    Formats: kohya (both SDXL UNet namings, FLUX.1's BFL names), LyCORIS LoCon / LoHa / LoKr (the last two
    rebuilt to dense ΔW), diffusers attention-processor, diffusers and PEFT (`transformer.` for FLUX.1), and FLUX.1
    ComfyUI / BFL / XLabs files. Fused FLUX.1 layers (qkv, linear1) are split exactly into diffusers' modules. `base` (a pipeline, a {component: module} mapping or a
    UNet) resolves kohya names against that model's modules; without it, against real SD1.5 / SDXL.
    Call `validate_lora` next: loading checks the file, not whether it fits a model.
    """
    tensors, metadata = read_tensors(path, allow_pickle=allow_pickle)
    source = str(path)
    family = detect_format(list(tensors), source)
    if family == "kohya":
        state = kohya.read(tensors, metadata, _resolver(base), source)
    elif family == "bfl":
        state = bfl.read(tensors, metadata, source)
    else:
        state = diffusers.read(tensors, metadata, source)
    check_magnitudes(state)
    return state


def check_lora_file(path: str | os.PathLike, *, allow_pickle: bool = False) -> None:
    """Every check of `load_lora` that needs no base model, run on `path` and the result dropped. Commands that
    load a base before their LoRAs call this first, so a broken file fails in a second, not after the model has
    loaded (the file is read twice; a LoRA is small next to a base)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real load, against the base, warns
        load_lora(path, allow_pickle=allow_pickle)


def kohya_layout(arch: str, base: object | None) -> UnetLayout | None:
    """The UNet layout kohya names are written against (the base's own when given)."""
    return _layout(arch, base)


def _layout(arch: str, base: object | None) -> UnetLayout | None:
    if base is not None:
        from lorafuse.lora.targets import base_modules

        layout = base_modules(base).layout
        if layout is not None:
            return layout
    reference = get_family(arch).reference_unet
    return UnetLayout.from_config(reference) if reference is not None else None


def save_lora(
    state: LoraState,
    path: str | os.PathLike,
    *,
    format: str = "kohya",
    arch: str | None = None,
    metadata: Mapping[str, object] | None = None,
    training: Mapping[str, object] | None = None,
    base: object | None = None,
    uniform_alpha: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `state` atomically as .safetensors and return the path.

    format: "kohya" (default; loads in A1111, ComfyUI, kohya and diffusers) or "diffusers" (PEFT layout with
    diffusers' adapter metadata). arch: "sd15" | "sdxl" | "world" | "flux"; SDXL kohya files get SGM UNet
    names, FLUX.1 kohya files BFL names with fused qkv / linear1 (exact, see flux_keys.py). Default: "flux" for
    a LoRA on a FLUX.1 transformer, else "sd15".
    training: settings recorded as ss_* / modelspec.* (see formats/metadata.py TRAINING_KEYS).
    metadata: extra entries written last, verbatim. base: a model whose UNet layout differs from the
    real architecture's (the SGM block numbers depend on it). uniform_alpha (kohya only): when modules have
    different alphas, store one alpha and fold the ratios into `lora_up` (same ΔW), because diffusers loads
    per-module kohya alphas wrongly (see formats/kohya.py `with_uniform_alpha`); False keeps factors bit-exact.
    FLUX.1 kohya files keep per-module alphas: diffusers' FLUX converter reads them right.
    dtype: of every stored tensor (kohya's save_precision): float16 / bfloat16 halve the file; alphas too, as
    kohya stores them (alphas are small integers or simple fractions, exact in either).
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserInputError(f"{path}: lorafuse writes .safetensors files only")
    if format not in WRITE_FORMATS:
        raise UserInputError(f"unknown LoRA format {format!r}; choose from {', '.join(WRITE_FORMATS)}")
    if arch is None:
        # the first registered family whose denoiser the LoRA targets (SD1.5 for a UNet)
        comps = state.components()
        arch = next((f.name for f in FAMILIES.values() if f.denoiser_component in comps), "sd15")
    if arch not in ARCHS:
        raise UserInputError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    if not state.modules:
        raise LoraFormatError(f"{path}: nothing to save, the LoRA has no modules")
    for key, module in state.modules.items():
        for name in ("down", "up", "delta"):
            t = getattr(module, name)
            if t is not None and not torch.isfinite(t).all():
                raise LoraFormatError(f"{path}: module {key} has non-finite values in {name}; not saving it")

    if format == "kohya" and uniform_alpha and get_family(arch).uniform_alpha_ok:
        state = kohya.with_uniform_alpha(state)
    meta = build_metadata(state, fmt=format, arch=arch, path=path, training=training)
    if format == "kohya":
        tensors = kohya.write(state, arch, _layout(arch, base))
    else:
        tensors, format_meta = diffusers.write(state)
        meta.update(format_meta)
    meta.update({str(k): to_str(v) for k, v in (metadata or {}).items()})
    if dtype != torch.float32:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    _save_file(tensors, path, meta)
    return path


def save_tensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str], dtype: torch.dtype
) -> Path:
    """Write tensors already in a file layout (e.g. LyCORIS's own state_dict) atomically, floats as `dtype`."""
    path = Path(path)
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LoraFormatError(f"{path}: {key} has non-finite values; not saving it")
    out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    _save_file(out, path, dict(metadata))
    return path


def _save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    # safetensors refuses views that share storage; detached contiguous clones are always accepted
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    atomic_save_safetensors(path, tensors, metadata)


def estimated_size(state: LoraState) -> int:
    """Bytes a saved `state` takes (the tensors; metadata is small): for `check_output` before any work."""
    total = 0
    for m in state.modules.values():
        for t in (m.down, m.up, m.delta):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


__all__ = ["check_lora_file", "load_lora", "save_lora", "read_tensors", "KeyIndex"]
