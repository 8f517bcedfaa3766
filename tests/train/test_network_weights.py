"""network_weights / dim_from_weights: a LoRA file continues exactly where it stopped."""

from __future__ import annotations

import pytest
import torch

from lorafuse.errors import UserInputError
from lorafuse.lora.io import load_lora, save_lora
from lorafuse.models.tiny import tiny_pipeline
from lorafuse.train.config import NetworkConfig
from lorafuse.train.network import create_network


def _trained_file(tmp_path, net_cfg):
    pipe = tiny_pipeline("sd15", seed=0)
    torch.manual_seed(0)
    network = create_network(pipe, net_cfg, "sd15")
    with torch.no_grad():
        for p in network.named_parameters().values():
            p.add_(torch.randn_like(p) * 0.05)  # B != 0: a LoRA that does something
    path = save_lora(
        network.to_lora_state(), tmp_path / "first.safetensors", arch="sd15", uniform_alpha=False
    )
    return path, load_lora(path, base=pipe)


def _deltas(network):
    return {k: m.delta_weight() for k, m in network.to_lora_state().modules.items()}


def test_continue_with_the_same_settings_and_another_alpha(tmp_path):
    path, saved = _trained_file(tmp_path, NetworkConfig(network_dim=4, network_alpha=2))
    expected = {k: m.delta_weight() for k, m in saved.modules.items()}
    for alpha in (2, 8):  # 8: lora_up is rescaled so ΔW stays the file's
        pipe = tiny_pipeline("sd15", seed=0)
        net = create_network(
            pipe, NetworkConfig(network_dim=4, network_alpha=alpha, network_weights=path), "sd15"
        )
        got = _deltas(net)
        assert got.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-7)


def test_dim_from_weights_takes_the_files_ranks(tmp_path):
    path, saved = _trained_file(
        tmp_path, NetworkConfig(network_dim=3, network_alpha=1, network_train_unet_only=True)
    )
    pipe = tiny_pipeline("sd15", seed=0)
    net = create_network(
        pipe, NetworkConfig(network_dim=16, network_weights=path, dim_from_weights=True), "sd15"
    )
    assert set(net.plan) == {"unet"}  # the file's modules only, not the text encoder the settings ask for
    assert {r for comp in net.plan.values() for r, _ in comp.values()} == {3}
    got = _deltas(net)
    for k, m in saved.modules.items():
        torch.testing.assert_close(got[k], m.delta_weight(), rtol=1e-5, atol=1e-7)


def test_rank_mismatch_is_one_clear_error(tmp_path):
    path, _ = _trained_file(tmp_path, NetworkConfig(network_dim=4))
    with pytest.raises(UserInputError, match="has rank 4, the network 8; set network_dim"):
        create_network(
            tiny_pipeline("sd15", seed=0), NetworkConfig(network_dim=8, network_weights=path), "sd15"
        )
