"""Perceptual feature networks: VGG-19 from torchvision-named weights, the oracle, the loss."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lorafuse.backbone.features import _VGG19, load_features, perceptual_loss
from lorafuse.errors import UserInputError


def vgg_weights() -> dict[str, torch.Tensor]:
    """Random weights under torchvision's `vgg19().features` names (conv i at Sequential index i)."""
    out, index, cin = {}, 0, 3
    g = torch.Generator().manual_seed(0)
    for v in _VGG19:
        if v == "M":
            index += 1
            continue
        out[f"features.{index}.weight"] = torch.randn(v, cin, 3, 3, generator=g) * 0.05
        out[f"features.{index}.bias"] = torch.zeros(v)
        out[f"classifier.{index}.weight"] = torch.zeros(1)  # a full state dict carries more; ignored
        index, cin = index + 2, v
    return out


def test_vgg19_taps_relu1_1_to_relu5_1(tmp_path) -> None:
    path = tmp_path / "vgg19.safetensors"
    save_file(vgg_weights(), str(path))
    net = load_features(f"vgg19:{path}")
    maps = net(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert [m.shape[1] for m in maps] == [64, 128, 256, 512, 512]
    assert [m.shape[-1] for m in maps] == [32, 16, 8, 4, 2]
    assert all(bool((m >= 0).all()) for m in maps)  # after ReLU
    assert not any(p.requires_grad for p in net.parameters())
    weights = vgg_weights()
    del weights["features.28.weight"]
    save_file(weights, str(tmp_path / "broken.safetensors"))
    with pytest.raises(UserInputError, match="features.28.weight"):
        load_features(f"vgg19:{tmp_path / 'broken.safetensors'}")
    with pytest.raises(UserInputError, match="safetensors"):
        load_features(f"vgg19:{tmp_path / 'vgg19.pth'}")


def test_oracle_features_and_loss(tmp_path) -> None:
    from lorafuse.world.oracle import OracleModel

    path = tmp_path / "oracle.safetensors"
    save_file({k: v.contiguous() for k, v in OracleModel().state_dict().items()}, str(path))
    net = load_features(f"oracle:{path}")
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # resized to the oracle's 64 px
    assert len(net(x)) == 12
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert perceptual_loss(net, x, x) == 0
    loss = perceptual_loss(net, y, x)
    loss.backward()
    assert loss > 0 and y.grad.abs().sum() > 0
    assert load_features("none") is None
    with pytest.raises(UserInputError, match="unknown perceptual features"):
        load_features("lpips")
