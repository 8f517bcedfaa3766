"""Block-wise learning rates as kohya's networks.lora defines them (down / mid / up weights, presets, threshold)."""

from __future__ import annotations

import math

import pytest
import torch

from lorafuse.lora.keys import UnetLayout
from lorafuse.models.tiny import tiny_pipeline
from lorafuse.train.block_lr import preset_weights
from lorafuse.train.config import NetworkConfig
from lorafuse.train.kohya_import import convert_flat
from lorafuse.train.network import block_labels, block_of, create_network


def test_presets_follow_kohyas_formulas():
    assert preset_weights("linear", 5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert preset_weights("reverse_linear+0.5", 3) == [1.5, 1.0, 0.5]
    assert preset_weights("zeros+0.2", 2) == [0.2, 0.2]
    sine = preset_weights("sine", 12)
    assert (
        sine[0] == 0.0
        and sine[-1] == pytest.approx(1.0)
        and sine[6] == pytest.approx(math.sin(math.pi * 6 / 22))
    )
    assert preset_weights("cosine", 12) == list(reversed(sine))


def test_each_block_gets_its_weight_and_zero_blocks_get_no_lora():
    pipe = tiny_pipeline("sd15", seed=0)
    labels = block_labels(pipe.unet)
    n_in = sum(label.startswith("IN") for label in labels)
    down = tuple(0.0 if i == 1 else i / 10 for i in range(n_in))  # IN01 weight 0: that block gets no LoRA
    torch.manual_seed(0)
    net = create_network(
        pipe, NetworkConfig(down_lr_weight=down, mid_lr_weight=2.0, up_lr_weight="zeros+0.5", network_train_unet_only=True),
        "sd15",
    )  # fmt: skip
    layout = UnetLayout.from_config(pipe.unet.config)
    blocks = {p: block_of(p, layout) for p in net.plan["unet"]}
    assert "IN01" not in blocks.values()  # weight 0 <= block_lr_zero_threshold 0: no LoRA there
    plain = create_network(tiny_pipeline("sd15", seed=0), NetworkConfig(network_train_unet_only=True), "sd15")
    assert "IN01" in {block_of(p, layout) for p in plain.plan["unet"]}  # ... which it has without weights
    expected = {
        "MID": 2.0,
        **{f"OUT{i:02d}": 0.5 for i in range(20)},
        **{f"IN{i:02d}": i / 10 for i in range(n_in)},
    }
    groups = net.param_groups(1e-3, 1e-4)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for path, layer in net.layers("unet"):
        want = 1e-3 * expected.get(blocks[path], 1.0) if blocks[path] else 1e-3
        for p in (layer.lora_A["lorafuse_train"].weight, layer.lora_B["lorafuse_train"].weight):
            assert lr_of[id(p)] == pytest.approx(want), path
    assert sum(len(g["params"]) for g in groups) == len(net.named_parameters())


def test_kohya_network_args_map_to_block_weights():
    imp = convert_flat({
        "pretrained_model_name_or_path": "x", "train_data_dir": "d",
        "network_args": ["down_lr_weight=cosine+0.5", "mid_lr_weight=1.5", "up_lr_weight=0,0.5,1", "block_lr_zero_threshold=0.1"],
    })  # fmt: skip
    assert not imp.refused
    net = imp.data["network"]
    assert net["down_lr_weight"] == "cosine+0.5" and net["mid_lr_weight"] == 1.5
    assert net["up_lr_weight"] == [0.0, 0.5, 1.0] and net["block_lr_zero_threshold"] == 0.1


def test_kohya_sdxl_layout_23_block_dims_and_three_mid_weights():
    """kohya's SDXL lists: 23 entries (embeddings, IN00-08 = input_blocks 0-8, middle_block 0-2, OUT00-08, out)
    and mid_lr_weight per middle_block; the same ranks as our 19-entry form where the two agree."""
    from lorafuse.lora.keys import unet_to_sgm
    from lorafuse.train.network import plan_network

    ours = [2 + i % 3 for i in range(19)]  # IN00..IN08, MID, OUT00..OUT08
    kohya = [9] + ours[:9] + [ours[9]] * 3 + ours[10:] + [9]  # the same ranks in kohya's layout
    pipe = tiny_pipeline("sdxl", seed=0)
    a = plan_network(pipe, NetworkConfig(block_dims=tuple(ours), network_train_unet_only=True), "sdxl")
    b = plan_network(pipe, NetworkConfig(block_dims=tuple(kohya), network_train_unet_only=True), "sdxl")
    assert a == b
    kohya[11] = 0  # middle_block.1 (the transformer) only
    c = plan_network(pipe, NetworkConfig(block_dims=tuple(kohya), network_train_unet_only=True), "sdxl")["unet"]
    layout = UnetLayout.from_config(pipe.unet.config)
    gone = set(a["unet"]) - set(c)
    assert gone and all(unet_to_sgm(p, layout).startswith("middle_block.1.") for p in gone)
    with pytest.raises(Exception, match="kohya's SDXL layout of 23"):
        plan_network(pipe, NetworkConfig(block_dims=(4,) * 20), "sdxl")
    # three mid weights: middle_block.1's modules get the second, and a 0 drops them
    torch.manual_seed(0)
    net = create_network(tiny_pipeline("sdxl", seed=0), NetworkConfig(mid_lr_weight=(1.0, 0.5, 2.0), conv_dim=2,
                         network_train_unet_only=True), "sdxl")  # fmt: skip (LoCon: the mid ResNets too)
    mids = {p: w for p, w in net.lr_weights.items() if unet_to_sgm(p, layout).startswith("middle_block.")}
    assert mids and {w for p, w in mids.items() if unet_to_sgm(p, layout).startswith("middle_block.1.")} == {0.5}
    assert {w for p, w in mids.items() if unet_to_sgm(p, layout).startswith("middle_block.2.")} == {2.0}
    imp = convert_flat({"pretrained_model_name_or_path": "x", "train_data_dir": "d",
                        "network_args": ["mid_lr_weight=1,0,1", "down_lr_weight=1,1,1"]})  # fmt: skip
    assert not imp.refused and imp.data["network"]["mid_lr_weight"] == [1.0, 0.0, 1.0]


def test_short_and_long_weight_lists_are_filled_or_cut_as_kohya(caplog):
    from lorafuse.train.block_lr import block_lr_weights

    labels = block_labels(tiny_pipeline("sd15", seed=0).unet)
    w = block_lr_weights(NetworkConfig(down_lr_weight=(0.5, 0.25), up_lr_weight=(0.1,) * 14), labels)
    assert [w[f"IN{i:02d}"] for i in range(12)] == [0.5, 0.25] + [1.0] * 10
    assert all(w[f"OUT{i:02d}"] == 0.1 for i in range(12))
    assert "filled with 1.0 as kohya does" in caplog.text and "cut as kohya does" in caplog.text
