"""Per-image scores of grid cells: oracle (world bases), CLIP-I / CLIP-T / DINO (user-given models); the
metrics derived from them are `eval.measures`. References are loaded and embedded once, when the scorer is built, so a
missing folder or a wrong model fails before anything samples."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np

from lorafuse.errors import ConfigError, UserInputError
from lorafuse.eval.grid_config import WORLD_BASES, MetricsConfig
from lorafuse.eval.metrics import OracleScorer, load_reference_folder, world_references

log = logging.getLogger(__name__)



def _references(cfg: MetricsConfig) -> tuple[np.ndarray | None, np.ndarray | None]:
    content = style = None
    if cfg.content_references is not None:
        content = load_reference_folder(cfg.content_references, "content")
    elif cfg.individual is not None:
        content = world_references(individual=cfg.individual)
    if cfg.style_references is not None:
        style = load_reference_folder(cfg.style_references, "style")
    elif cfg.style is not None:
        style = world_references(style=cfg.style)
    return content, style


def _load_oracle(cfg: MetricsConfig, bases: list[str], given: Any) -> Any:
    if cfg.oracle is False:
        return None
    if cfg.oracle is None and not any(b in WORLD_BASES for b in bases):
        return None
    if given is not None:
        return given
    from lorafuse.world.oracle import Oracle

    try:
        return Oracle.load(cfg.oracle_path)
    except UserInputError:
        if cfg.oracle:
            raise
        log.warning("oracle weights not installed: this grid has no oracle metrics (train them with "
                    "`lorafuse world train-oracle`)")  # fmt: skip
        return None


class GridScorer:
    """`score(images, bases)` -> one dict of raw scores per image; `signature` changes whenever they would."""

    def __init__(self, cfg: MetricsConfig, bases: list[str], prompt: str, *, oracle: Any = None):
        from lorafuse.eval.embedders import ClipEmbedder, DinoEmbedder, OpenClipEmbedder

        self.cfg, self.prompt = cfg, prompt
        content, style = _references(cfg)
        self.oracle = _load_oracle(cfg, bases, oracle)
        self.oracle_all_bases = bool(cfg.oracle)  # asked for explicitly: judge every base, not only the world
        self._oracle = None
        if self.oracle is not None:
            self._oracle = OracleScorer(self.oracle, individual=cfg.individual, style=cfg.style,
                                        content_references=content, style_references=style)  # fmt: skip
        self.clip = self.dino = None
        self._clip_refs: dict[str, Any] = {}
        if cfg.clip_arch is not None and cfg.clip is None:
            raise ConfigError(f"metrics.clip_arch = {cfg.clip_arch!r} needs metrics.clip, the weights file")
        if cfg.clip is not None:
            if cfg.clip_arch is not None:
                self.clip = OpenClipEmbedder.load(cfg.clip_arch, cfg.clip, device=cfg.device)
            else:
                self.clip = ClipEmbedder.load(cfg.clip, device=cfg.device)
            self._clip_refs = {k: self.clip.image_embeds(v) for k, v in (("content", content), ("style", style))
                               if v is not None}  # fmt: skip
        if cfg.dino is not None:
            if content is None:
                raise ConfigError("metrics.dino compares with content references: set metrics.content_references "
                                  "(a folder) or metrics.individual (a world individual)")  # fmt: skip
            self.dino = DinoEmbedder.load(cfg.dino, device=cfg.device)
            self._dino_refs = self.dino.image_embeds(content)
        sig = {"metrics": {k: str(v) for k, v in vars(cfg).items()}, "prompt": prompt,
               "oracle": None if self.oracle is None else str(cfg.oracle_path or "default")}  # fmt: skip
        self.signature = hashlib.sha1(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def active(self) -> bool:
        return self.oracle is not None or self.clip is not None or self.dino is not None

    def score(self, images: np.ndarray, bases: list[str]) -> list[dict[str, Any]]:
        """images: (N, H, W, 3) uint8, bases: the base of each image (the oracle judges world images only)."""
        n = len(images)
        rows: list[dict[str, Any]] = [{} for _ in range(n)]

        def put(values: dict[str, np.ndarray], where: list[int]) -> None:
            for key, arr in values.items():
                for j, i in enumerate(where):
                    rows[i][key] = arr[j].item() if hasattr(arr[j], "item") else arr[j]

        if self._oracle is not None:
            idx = [i for i, b in enumerate(bases) if self.oracle_all_bases or b in WORLD_BASES]
            if idx:
                put(self._oracle(images[idx]), idx)
        every = list(range(n))
        if self.clip is not None:
            got = {"clip_t": self.clip.text_similarity(images, self.prompt, self.cfg.triggers)}
            emb = self.clip.image_embeds(images)
            for role, refs in self._clip_refs.items():
                got[f"clip_i_{role}"] = (emb.double() @ refs.double().T).mean(1).numpy()
            put(got, every)
        if self.dino is not None:
            put({"dino_content": self.dino.image_similarity(images, self._dino_refs)}, every)
        return rows
