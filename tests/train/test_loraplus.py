"""LoRA+ (kohya's loraplus_lr_ratio / loraplus_unet_lr_ratio / loraplus_text_encoder_lr_ratio): every B factor at
ratio x the learning rate of its group, A factors unchanged, block LR weights kept."""

from __future__ import annotations

import pytest
import torch

from lorafuse.config.toml_io import config_from_dict
from lorafuse.errors import ConfigError
from lorafuse.models.tiny import tiny_pipeline
from lorafuse.train.config import NetworkConfig, TrainConfig
from lorafuse.train.config_optim import OptimizerConfig
from lorafuse.train.kohya_import import convert_flat
from lorafuse.train.loraplus import ratios, split_groups
from lorafuse.train.network import create_network


def _groups(net_cfg: NetworkConfig, opt: OptimizerConfig):
    torch.manual_seed(0)
    network = create_network(tiny_pipeline("sd15", seed=0), net_cfg, "sd15")
    names = {id(p): n for n, p in network.named_parameters().items()}
    groups = split_groups(network.param_groups(1e-3, 1e-4), names, *ratios(opt))
    return network, names, groups


def test_b_factors_train_at_ratio_times_the_lr():
    network, names, groups = _groups(NetworkConfig(), OptimizerConfig(loraplus_lr_ratio=4, loraplus_unet_lr_ratio=16))
    lr = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert sorted(lr) == sorted(names)  # every parameter in exactly one group
    assert sum(len(g["params"]) for g in groups) == len(names)
    for pid, name in names.items():
        base = 1e-3 if name.startswith("unet.") else 1e-4
        ratio = (16 if name.startswith("unet.") else 4) if ".lora_B." in name else 1
        assert lr[pid] == pytest.approx(base * ratio), name
    assert {g["name"] for g in groups} == {"unet", "unet_plus", "text_encoder", "text_encoder_plus"}


def test_block_weights_and_ratio_multiply():
    _, names, groups = _groups(NetworkConfig(mid_lr_weight=0.5, network_train_unet_only=True),
                               OptimizerConfig(loraplus_lr_ratio=8))  # fmt: skip
    by_name = {g["name"]: g["lr"] for g in groups}
    assert by_name["unet"] == pytest.approx(1e-3) and by_name["unet_plus"] == pytest.approx(8e-3)
    assert by_name["unet_x0.5"] == pytest.approx(5e-4) and by_name["unet_x0.5_plus"] == pytest.approx(4e-3)


def test_kohya_keys_map_and_lycoris_refuses_loraplus():
    imp = convert_flat({"pretrained_model_name_or_path": "sd15-tiny", "train_data_dir": "d", "loraplus_lr_ratio": 16,
                        "network_args": ["loraplus_text_encoder_lr_ratio=4"]})  # fmt: skip
    assert not imp.refused
    opt = config_from_dict(TrainConfig, imp.data, "<kohya>").optimizer
    assert (opt.loraplus_lr_ratio, opt.loraplus_text_encoder_lr_ratio) == (16.0, 4.0)
    imp.data["network"] = {"network_module": "lycoris.kohya"}
    with pytest.raises(ConfigError, match="scale_weight_norms are for networks.lora"):
        config_from_dict(TrainConfig, imp.data, "<kohya>")


def test_a_run_with_loraplus_trains(train_overrides):
    from lorafuse.train.config import load_train_config
    from lorafuse.train.loop import train_lora

    cfg = load_train_config(None, train_overrides(**{"training.max_train_steps": 2, "optimizer.loraplus_lr_ratio": 16,
                                                     "optimizer.scale_weight_norms": 1.0}))  # fmt: skip
    result = train_lora(cfg)
    assert result.global_step == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_scale_weight_norms_caps_every_delta_norm_as_kohya():
    """kohya's max-norm rule: a module with ‖ΔW‖_F > max_norm gets A and B each x √(max_norm / ‖ΔW‖), so its ΔW
    norm becomes max_norm; a module below it is untouched."""
    from lorafuse.train.max_norm import apply_max_norm

    torch.manual_seed(0)
    network = create_network(tiny_pipeline("sd15", seed=0), NetworkConfig(network_dim=4, network_alpha=4), "sd15")
    with torch.no_grad():
        for i, p in enumerate(network.named_parameters().values()):
            p.copy_(torch.randn_like(p) * (0.5 if i % 4 < 2 else 0.01))  # some modules large, some small
    before = {(c, path): layer.get_delta_weight(network.adapter).norm().item()
              for c in network.plan for path, layer in network.layers(c)}  # fmt: skip
    max_norm = sorted(before.values())[len(before) // 2]  # about half the modules above it
    assert apply_max_norm(network, max_norm) == sum(n > max_norm for n in before.values())
    for c in network.plan:
        for path, layer in network.layers(c):
            after = layer.get_delta_weight(network.adapter).norm().item()
            expected = min(before[(c, path)], max_norm)
            assert after == pytest.approx(expected, rel=1e-4), path
    imp = convert_flat({"pretrained_model_name_or_path": "sd15-tiny", "train_data_dir": "d", "scale_weight_norms": 1.0})
    assert config_from_dict(TrainConfig, imp.data, "<kohya>").optimizer.scale_weight_norms == 1.0
    imp = convert_flat({"pretrained_model_name_or_path": "sd15-tiny", "train_data_dir": "d", "scale_weight_norms": 0})
    assert config_from_dict(TrainConfig, imp.data, "<kohya>").optimizer.scale_weight_norms is None
