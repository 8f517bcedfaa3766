"""Resumable training state: everything a killed run needs to continue as if it had never stopped.

A state folder (`<output_name>-step00000040-state/`, kohya's naming) holds, with no pickled objects:
    lora.safetensors   the trainable LoRA parameters, by name ('unet.<peft parameter name>')
    state.pt           optimizer, LR schedule and RNG states: tensors and plain containers only, written with
                       torch.save and read back with torch.load(weights_only=True)
    progress.json      epoch / batch position / optimizer step, python and numpy RNG scalars, the config
    log.csv            the loss log up to this step (so the resumed run's curve is the whole run)
The folder is written under a temporary name and renamed into place: a kill during the save leaves either the
previous state or the new one, never half of one.

Bit-identical resume on CPU rests on: the data order being a function of (seed, epoch) (data.py), saving only at
optimizer-step boundaries (no half-accumulated gradients), and restoring every random stream the loop draws
from: the torch global RNG (LoRA dropout), the loop's noise / timestep generator, numpy's and python's global
RNGs (third-party code), and CUDA's when present.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lorafuse import __version__
from lorafuse.errors import UserInputError
from lorafuse.utils.atomic import atomic_folder, safetensors_bytes_to

STATE_VERSION = 1
FILES = ("lora.safetensors", "state.pt", "progress.json")
# Settings a resumed run may change: where and how often it writes and samples, and the caches (speed only;
# cached latents are encoded in other batch sizes, so the last float digits may differ).
RESUME_FREE_KEYS = {
    "training": {
        "output_dir",
        "output_name",
        "resume",
        "save_every_n_epochs",
        "save_every_n_steps",
        "save_state",
        "sample_every_n_epochs",
        "sample_every_n_steps",
        "sample_prompts",
        "sample_steps",
        "logging",
    },
    "dataset": {"cache_latents", "cache_latents_to_disk", "cache_dir", "on_bad_image"},
}


@dataclass(frozen=True)
class Progress:
    epoch: int  # the epoch to continue in
    batch_in_epoch: int  # micro-batches of that epoch this process has done
    global_step: int  # optimizer steps done


@dataclass(frozen=True)
class SavedState:
    folder: Path
    progress: Progress
    config: dict[str, Any]
    extra: dict[str, Any]


def rng_state(generator: torch.Generator) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    plain = {
        "numpy": {
            "kind": kind,
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "python": {"version": version, "state": list(py_state), "gauss_next": py_gauss},
    }
    tensors = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
    }
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return plain, tensors


def _set_rng_state(
    plain: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], generator: torch.Generator
) -> None:
    n = plain["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = plain["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    torch.set_rng_state(tensors["torch"])
    generator.set_state(tensors["generator"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))


def save_train_state(
    folder: Path,
    *,
    lora: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    generator: torch.Generator,
    progress: Progress,
    config: Mapping[str, Any],
    log_csv: Path | None = None,
    scaler: Any = None,
    process_rngs: Sequence[tuple[dict[str, Any], dict[str, torch.Tensor]]] | None = None,
) -> Path:
    """Write a resumable state folder atomically and return its path.

    process_rngs: in a run of several processes, every process's `rng_state` in process order (each process
    draws LoRA dropout from its own global RNG); None in a one-process run."""
    plain_rng, tensor_rng = rng_state(generator) if process_rngs is None else process_rngs[0]
    state = {
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "rng": tensor_rng,
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    meta = {
        "state_version": STATE_VERSION,
        "lorafuse_version": __version__,
        "progress": asdict(progress),
        "rng": plain_rng,
        "config": dict(config),
        "num_processes": 1 if process_rngs is None else len(process_rngs),
    }
    if process_rngs is not None:
        state["rng_processes"] = [tensors for _, tensors in process_rngs]
        meta["rng_processes"] = [plain for plain, _ in process_rngs]
    with atomic_folder(Path(folder)) as tmp:
        safetensors_bytes_to(
            tmp / "lora.safetensors", {k: v.detach().contiguous().clone() for k, v in lora.items()}
        )
        torch.save(state, tmp / "state.pt")
        if log_csv is not None and log_csv.is_file():
            shutil.copyfile(log_csv, tmp / "log.csv")
        (tmp / "progress.json").write_text(json.dumps(meta, indent=1))
    return Path(folder)


def read_train_state(folder: str | os.PathLike) -> SavedState:
    """Check a state folder and read its progress and config (cheap: run before loading any model)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"{folder}: resume state folder not found (written by save_state = true)")
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise UserInputError(
            f"{folder}: not a lorafuse training state (missing {', '.join(missing)}); resume from a folder "
            "named <output_name>-...-state that a run with save_state = true wrote"
        )
    try:
        meta = json.loads((folder / "progress.json").read_text())
        progress = Progress(**meta["progress"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"{folder / 'progress.json'}: unreadable training state ({e})") from e
    if meta.get("state_version") != STATE_VERSION:
        raise UserInputError(
            f"{folder}: state version {meta.get('state_version')} is not {STATE_VERSION}; it was written by another "
            "lorafuse version and cannot be resumed exactly"
        )
    return SavedState(folder, progress, meta["config"], meta)


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], source: Path) -> None:
    """A resumed run must train the same thing: every setting except where/how often it writes must match."""
    diffs = []
    for table in sorted(set(saved) | set(current)):
        old, new = saved.get(table, {}), current.get(table, {})
        for key in sorted(set(old) | set(new)):
            if key in RESUME_FREE_KEYS.get(table, set()):
                continue
            if old.get(key) != new.get(key):
                diffs.append(f"{table}.{key}: saved {old.get(key)!r}, now {new.get(key)!r}")
    if diffs:
        raise UserInputError(
            f"{source}: the state was trained with other settings ({'; '.join(diffs[:4])}"
            f"{'; ...' if len(diffs) > 4 else ''}). Resume with the saved config ({source / 'progress.json'})."
        )


def check_resume_processes(saved: SavedState, num_processes: int) -> None:
    """A state continues exactly only in a run of as many processes as saved it (each has its own random
    streams and its share of every global batch)."""
    saved_processes = saved.extra.get("num_processes", 1)
    if saved_processes != num_processes:
        raise UserInputError(
            f"{saved.folder}: the state was saved by a run of {saved_processes} process(es) and this run has "
            f"{num_processes}; resume with --num-processes {saved_processes}"
        )


def restore_train_state(
    saved: SavedState,
    *,
    load_lora: Any,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    generator: torch.Generator,
    scaler: Any = None,
    process_index: int = 0,
    num_processes: int = 1,
) -> None:
    """Put the saved LoRA (via `load_lora(tensors, source)`), optimizer, schedule and RNG states back; this
    process's own RNG states when several processes saved them."""
    folder = saved.folder
    check_resume_processes(saved, num_processes)
    try:
        tensors = load_file(str(folder / "lora.safetensors"))
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserInputError(f"{folder}: cannot read the training state ({e})") from e
    load_lora(tensors, str(folder / "lora.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if num_processes == 1:
        _set_rng_state(saved.extra["rng"], state["rng"], generator)
    else:
        _set_rng_state(saved.extra["rng_processes"][process_index], state["rng_processes"][process_index], generator)
