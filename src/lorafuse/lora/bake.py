"""Bake LoRAs into a base model and save the result as a new diffusers pipeline folder.

What kohya's `networks/merge_lora.py --save_to` and A1111's checkpoint merger do: W' = W + Σ w_i ΔW_i written
into the weights, so the folder is a "fine-tuned checkpoint" every tool loads as a base (the character-style-transfer paper, Chu, compares a
character LoRA across such checkpoints). Each LoRA is validated against the base before anything is fused, the
fusing itself is `lora.merge.fuse_into`, and the folder appears whole or not at all (written beside, renamed).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from lorafuse.errors import LoraFormatError, UserInputError
from lorafuse.utils.atomic import atomic_folder, check_output
from lorafuse.utils.inputs import check_input_file


def bake_loras(base: str, loras: Sequence[tuple[str | os.PathLike, float]], out: str | os.PathLike, *,
               allow_pickle: bool = False) -> Path:  # fmt: skip
    """Load `base`, fuse every (LoRA file, weight) into its weights, save a pipeline folder at `out`."""
    from lorafuse.lora.io import check_lora_file, load_lora
    from lorafuse.lora.merge import fuse_into
    from lorafuse.models.load import base_folder, load_base_pipeline

    out = Path(out)
    if not loras:
        raise UserInputError("bake needs at least one LoRA file")
    if out.exists():
        raise UserInputError(f"{out}: already exists; choose a new folder (a baked model is never overwritten)")
    check_output(out, kind="folder", what="baked model folder", estimate=_weights_bytes(base))
    for path, _ in loras:  # a missing, unreadable or broken file must show before the base loads
        check_input_file(path, "LoRA file", LoraFormatError)
        check_lora_file(path, allow_pickle=allow_pickle)
    pipe = load_base_pipeline(base)
    # read every file before fusing any: a broken second file must not cost the first one's fuse
    states = [load_lora(path, allow_pickle=allow_pickle, base=pipe) for path, _ in loras]
    record = [{"lora": str(path), "weight": float(weight), "modules": fuse_into(pipe, state, float(weight))}
              for (path, weight), state in zip(loras, states, strict=True)]  # fmt: skip
    with atomic_folder(out) as tmp:
        pipe.save_pretrained(tmp)
        source = base_folder(base)  # its CLIP tokenizer files are copied as they are
        for sub in ("tokenizer", "tokenizer_2"):
            # transformers 5 writes only tokenizer.json; keep the CLIP vocab.json + merges.txt other tools read
            if source is not None and (source / sub).is_dir():
                shutil.copytree(source / sub, tmp / sub, dirs_exist_ok=True)
        (tmp / "lorafuse_bake.json").write_text(json.dumps({"base": base, "loras": record}, indent=1))
    return out


def _weights_bytes(base: str) -> int:
    """Bytes of the base's weight files on disk: about what the baked folder takes (0 for a built-in base)."""
    path = Path(base)
    if path.is_file() and path.suffix != ".toml":
        return path.stat().st_size
    if path.is_dir():
        suffixes = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
        return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in suffixes and p.is_file())
    return 0
