"""Feature networks for the backbone's perceptual loss (docs/algorithms.md §7.1):

    L_perc = Σ_j (1 / N_j) ‖φ_j(x̂_0) − φ_j(x_0)‖²        φ_j: the j-th feature map, N_j its number of elements

The paper uses VGG-19 relu1_1 ... relu5_1. Nothing downloads here, so φ is pluggable; `load_features(spec)`:
    "world-oracle"     the shipped oracle's content and style encoders (`world.oracle.Encoder.feature_maps`);
                       "oracle:PATH" for another oracle file. Built-in world only (it knows nothing else).
    "vgg19:PATH"       VGG-19 from a .safetensors of torchvision's `vgg19().features` weights (keys
                       `features.0.weight` ...; a full torchvision state dict also works), taps relu1_1 ...
                       relu5_1, ImageNet normalisation. Convert a torchvision .pth once with safetensors.
    "random"           a tiny random conv net (tests only: measures nothing real).
    "none"             no perceptual term.
Every network takes images (B, 3, H, W) in [-1, 1] and returns a list of feature maps; its weights are frozen.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorafuse.errors import UserInputError

FeatureNet = Callable[[torch.Tensor], list[torch.Tensor]]

# torchvision's vgg19 "E" configuration; "M" is a 2x2 max-pool
_VGG19 = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    512,
    "M",
)
_VGG19_TAPS = (1, 6, 11, 20, 29)  # indices of relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 in `features`
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def perceptual_loss(features: FeatureNet, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ_j mean((φ_j(x̂) − φ_j(x))²) per batch; the target's features carry no gradient."""
    with torch.no_grad():
        want = features(target)
    got = features(prediction)
    return sum(F.mse_loss(a, b) for a, b in zip(got, want, strict=True))


class _Frozen(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval().requires_grad_(False)


class OracleFeatures(_Frozen):
    """Both oracle encoders' feature maps: the content encoder's shapes and the style encoder's textures."""

    def __init__(self, content: nn.Module, style: nn.Module):
        super().__init__(nn.ModuleList([content, style]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[-1] != 64:  # the oracle is trained on 64 px renders
            x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        return [f for enc in self.net for f in enc.feature_maps(x)]


class VGG19Features(_Frozen):
    def __init__(self, state: dict[str, torch.Tensor], source: str):
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG19:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
                cin = v
        features = nn.Sequential(*layers[: _VGG19_TAPS[-1] + 1])
        wanted = {k: v for k, v in features.state_dict().items()}
        given = {
            k.removeprefix("features."): v
            for k, v in state.items()
            if k.startswith("features.") or k[0].isdigit()
        }
        missing = sorted(set(wanted) - set(given))
        if missing:
            raise UserInputError(
                f"{source}: not torchvision VGG-19 feature weights ({len(missing)} of {len(wanted)} tensors missing, "
                f"e.g. features.{missing[0]})"
            )
        features.load_state_dict({k: given[k] for k in wanted})
        super().__init__(features)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x + 1) / 2 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i in _VGG19_TAPS:
                out.append(x)
        return out


class RandomFeatures(_Frozen):
    """Three random conv layers (tests: a perceptual term that is cheap and differentiable)."""

    def __init__(self, seed: int = 0, width: int = 8):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = nn.Sequential(
                nn.Conv2d(3, width, 3, 2, 1), nn.SiLU(), nn.Conv2d(width, width, 3, 2, 1), nn.SiLU(),
                nn.Conv2d(width, width, 3, 2, 1),
            )  # fmt: skip
        super().__init__(net)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for layer in self.net:
            x = layer(x)
            if isinstance(layer, nn.Conv2d):
                out.append(x)
        return out


def load_features(spec: str) -> nn.Module | None:
    """A frozen feature network from its spec (see the module docstring); None for "none"."""
    kind, _, arg = spec.partition(":")
    if kind == "none":
        return None
    if kind == "random":
        return RandomFeatures(int(arg or 0))
    if kind in ("world-oracle", "oracle"):
        from lorafuse.world.oracle import Oracle

        oracle = Oracle.load(arg or None)  # names the missing file and how to train it
        return OracleFeatures(oracle.model.content, oracle.model.style)
    if kind == "vgg19":
        path = Path(arg).expanduser()
        if path.suffix != ".safetensors" or not path.is_file():
            raise UserInputError(
                f"features {spec!r}: give an existing .safetensors file of torchvision VGG-19 weights "
                "(pickled .pth files are not loaded; convert with safetensors.torch.save_file)"
            )
        from safetensors.torch import load_file

        return VGG19Features(load_file(str(path)), str(path))
    raise UserInputError(
        f"unknown perceptual features {spec!r}; use world-oracle, oracle:PATH, vgg19:PATH.safetensors or none"
    )
