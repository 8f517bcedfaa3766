"""Oracle encoders: ground-truth judges of content (which individual, which class) and style.

Two small CNNs trained on unlimited renders with known factors (`oracle_train.py`). Each maps an image to a
unit-norm embedding; heads are cosine classifiers over that embedding, so cosine similarity between two
embeddings is exactly the quantity the classifier was trained to separate ("same individual", "same style").

What they can tell: identity of any world individual (seen or held out) across all 13 styles, its class, and
the style of any world image. What they cannot tell: anything about images outside the world (real photos),
image quality beyond what is needed to identify the factors, or "how much" style as a human would grade it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lorafuse.errors import UserInputError
from lorafuse.world.catalog import CLASS_NAMES, STYLE_NAMES, all_individuals

EMBED_DIM = 64
ORACLE_FILE = "oracle.safetensors"


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class CosineHead(nn.Module):
    """Logits = s · cos(embedding, class prototype): keeps the embedding space metric."""

    def __init__(self, dim: int, n: int, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, dim) * 0.1)
        self.scale = scale

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.scale * e @ F.normalize(self.weight, dim=1).T


class Encoder(nn.Module):
    """(B, 3, 64, 64) in [-1, 1] -> (B, EMBED_DIM) unit vectors. Mean and std pooling: std keeps texture."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            # stride-2 stem: full-resolution convs cost most and add little at 64x64
            _block(3, w, 2), _block(w, 2 * w, 1), _block(2 * w, 2 * w, 2),
            _block(2 * w, 4 * w, 1), _block(4 * w, 4 * w, 2), _block(4 * w, 4 * w, 1),
        )
        self.proj = nn.Sequential(nn.Linear(8 * w, 4 * w), nn.SiLU(), nn.Linear(4 * w, EMBED_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.cat([f.mean((2, 3)), f.flatten(2).std(2)], 1)
        return F.normalize(self.proj(pooled), dim=1)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Intermediate activations, for perceptual losses (CRAFT backbone on the built-in world)."""
        out = []
        for layer in self.features:
            x = layer(x)
            out.append(x)
        return out


class OracleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.content = Encoder()
        self.style = Encoder()
        self.individual_head = CosineHead(EMBED_DIM, len(all_individuals()))
        self.class_head = CosineHead(EMBED_DIM, len(CLASS_NAMES))
        self.style_head = CosineHead(EMBED_DIM, len(STYLE_NAMES))


def to_tensor(images) -> torch.Tensor:
    """uint8 (N, H, W, 3) array, a PIL image or a list of them -> float (N, 3, H, W) in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if not isinstance(images, np.ndarray):
        seq = images if isinstance(images, (list, tuple)) else [images]
        images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in seq])
    if images.ndim == 3:
        images = images[None]
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


@dataclass
class OracleVerdict:
    content: torch.Tensor  # (N, D) content embeddings
    style: torch.Tensor  # (N, D) style embeddings
    individual: list[str]  # predicted individual names
    cls: list[str]  # predicted class names
    style_name: list[str]  # predicted style names


class Oracle:
    """The judge. `Oracle.load()` uses the weights shipped with lorafuse."""

    def __init__(self, model: OracleModel):
        self.model = model.eval()
        self._names = [x.name for x in all_individuals()]

    @classmethod
    def load(cls, path: str | Path | None = None) -> Oracle:
        path = Path(path) if path else default_oracle_path()
        if not path.exists():
            raise UserInputError(f"{path}: oracle weights not found; train them with `lorafuse world train-oracle`")
        model = OracleModel()
        model.load_state_dict(load_file(str(path)))
        return cls(model)

    @torch.no_grad()
    def judge(self, images, batch: int = 256) -> OracleVerdict:
        x = to_tensor(images)
        if x.shape[-1] != 64:
            x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        cs, ss = [], []
        for i in range(0, len(x), batch):
            cs.append(self.model.content(x[i : i + batch]))
            ss.append(self.model.style(x[i : i + batch]))
        c, s = torch.cat(cs), torch.cat(ss)
        return OracleVerdict(
            content=c,
            style=s,
            individual=[self._names[k] for k in self.model.individual_head(c).argmax(1).tolist()],
            cls=[CLASS_NAMES[k] for k in self.model.class_head(c).argmax(1).tolist()],
            style_name=[STYLE_NAMES[k] for k in self.model.style_head(s).argmax(1).tolist()],
        )

    def content_similarity(self, images, references) -> torch.Tensor:
        """Mean cosine similarity of each image's content embedding to the references' (N,)."""
        a, b = self.judge(images).content, self.judge(references).content
        return (a @ b.T).mean(1)

    def style_similarity(self, images, references) -> torch.Tensor:
        a, b = self.judge(images).style, self.judge(references).style
        return (a @ b.T).mean(1)


def default_oracle_path() -> Path:
    return Path(str(resources.files("lorafuse.world") / "assets" / ORACLE_FILE))


@lru_cache(maxsize=1)
def default_oracle() -> Oracle:
    return Oracle.load()
