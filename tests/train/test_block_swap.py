"""Block swap (`training.blocks_to_swap`): kohya's split, the hooks' placement of each block at each point, and
training / sampling results identical to no swap.

On a CPU the real move (to host memory) changes nothing, so the placement is checked with a stand-in host:
float64 copies of the frozen weights (fp32 -> fp64 -> fp32 is exact). A block that ran on its "host" weights
would fail (float32 activations against float64 weights), and `events` shows every move in order."""

from __future__ import annotations

import pytest
import torch
from tests.flux_disk import flux_forward

from lorafuse.errors import UserInputError
from lorafuse.models.load import load_base_pipeline
from lorafuse.train.block_swap import BlockSwap, swap_counts, swapped_blocks
from lorafuse.train.config import NetworkConfig, load_train_config
from lorafuse.train.loop import train_lora
from lorafuse.train.network import create_network
from lorafuse.train.offload import enable_checkpointing


def _stand_in(blocks) -> BlockSwap:
    return BlockSwap(blocks, torch.device("cpu"), to_device=lambda t: t.float(), to_host=lambda t: t.double())


def _flux(seed: int = 0):
    """flux-tiny's transformer (2 double, 4 single blocks) with a non-zero LoRA, in train mode."""
    torch.manual_seed(seed)
    pipe = load_base_pipeline("flux-tiny")
    network = create_network(pipe, NetworkConfig(network_train_unet_only=True), None)
    for name, p in network.named_parameters().items():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return pipe.transformer.train(), network


def _call(transformer, grad: bool = True) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return flux_forward(transformer)


def test_kohya_split_and_its_limits():
    assert swap_counts(18, 19, 38) == (9, 18)  # kohya's FLUX.1 split: N // 2 double, 2 (N - N // 2) single
    assert swap_counts(3, 19, 38) == (1, 4)
    assert swap_counts(0, 19, 38) == (0, 0)
    with pytest.raises(UserInputError, match="blocks_to_swap = 40: .*20 double and 40 single.*at most 38"):
        swap_counts(40, 19, 38)


def test_training_gradients_and_block_placement_match_no_swap():
    transformer, network = _flux()
    enable_checkpointing(transformer, None)
    _call(transformer).pow(2).mean().backward()
    plain = {n: p.grad.clone() for n, p in network.named_parameters().items()}

    transformer, network = _flux()
    enable_checkpointing(transformer, None)
    blocks = swapped_blocks(transformer.transformer_blocks, transformer.single_transformer_blocks, 2)
    assert blocks == [transformer.transformer_blocks[1], *transformer.single_transformer_blocks[2:]]
    swap = _stand_in(blocks).install()
    assert [swap.where(i) for i in range(3)] == ["host"] * 3
    assert all(p.dtype == torch.float32 for p in network.named_parameters().values())  # the LoRA never moves
    swap.events.clear()
    out = _call(transformer)
    # forward: each swapped block visits the device once, in order, and is back on the host afterwards
    assert swap.events == [(0, "device"), (0, "host"), (1, "device"), (1, "host"), (2, "device"), (2, "host")]
    swap.events.clear()
    out.pow(2).mean().backward()
    # backward: checkpointing recomputes the blocks last to first, each on the device, one at a time
    visits = [i for i, where in swap.events if where == "device"]
    assert visits == [2, 1, 0]
    assert sum(swap.where(i) == "device" for i in range(3)) <= 1
    for name, grad in plain.items():
        assert torch.equal(network.named_parameters()[name].grad, grad), name


def test_a_block_run_on_its_host_weights_would_fail():
    """The stand-in catches a missed move: the hooks removed, the weights left on the "host"."""
    transformer, _ = _flux()
    swap = _stand_in(swapped_blocks(transformer.transformer_blocks, transformer.single_transformer_blocks, 2))
    swap.install()
    for handle in swap._handles:
        handle.remove()
    with pytest.raises(RuntimeError, match="dtype|Double|same"):
        _call(transformer, grad=False)


def test_sampling_with_swap_gives_the_same_prediction():
    transformer, _ = _flux()
    expected = _call(transformer, grad=False)
    swap = _stand_in(swapped_blocks(transformer.transformer_blocks, transformer.single_transformer_blocks, 4))
    swap.install()
    assert torch.equal(_call(transformer, grad=False), expected)
    assert [swap.where(i) for i in range(len(swap.blocks))] == ["host"] * 6
    swap.remove()
    assert all(p.dtype == torch.float32 for p in transformer.parameters())


def test_training_with_block_swap_matches_no_swap(tmp_path, tiny_flux):
    from lorafuse.world.dataset import write_subject_dataset

    write_subject_dataset("robot_09", tmp_path / "ds", n=2, repeats=1)
    losses = []
    for n in (0, 2):
        cfg = load_train_config(None, {
            "model.pretrained_model_name_or_path": "flux-tiny", "dataset.train_data_dir": str(tmp_path / "ds"),
            "dataset.resolution": "64", "training.gradient_checkpointing": "true",
            "training.blocks_to_swap": str(n), "training.max_train_steps": "2", "training.logging": "none",
            "training.output_dir": str(tmp_path / f"out{n}"),
        })  # fmt: skip
        losses.append(train_lora(cfg, progress_bar=False).losses)
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_config_and_kohya_import(train_overrides):
    with pytest.raises(UserInputError, match="blocks_to_swap: needs gradient_checkpointing"):
        load_train_config(None, train_overrides(**{"training.blocks_to_swap": 2}))
    cfg = load_train_config(None, train_overrides(**{"training.blocks_to_swap": 2,
                                                     "training.gradient_checkpointing": True}))  # fmt: skip
    with pytest.raises(
        UserInputError, match="blocks_to_swap is for FLUX.1's transformer blocks; .* has none"
    ):
        train_lora(cfg, progress_bar=False)
    from lorafuse.train.kohya_import import convert_flat

    assert convert_flat({"blocks_to_swap": 18}).data["training"] == {"blocks_to_swap": 18}


def test_estimate_counts_one_swapped_block_on_the_device(tmp_path):
    from lorafuse.train.estimate import estimate_memory
    from lorafuse.world.dataset import write_subject_dataset

    write_subject_dataset("robot_09", tmp_path / "ds", n=2, repeats=1)
    base = {"model.pretrained_model_name_or_path": "flux-tiny", "dataset.train_data_dir": str(tmp_path / "ds"),
            "dataset.resolution": "64", "training.gradient_checkpointing": "true"}  # fmt: skip
    plain = estimate_memory(load_train_config(None, base), device="cuda").parts["weights"]
    swapped = estimate_memory(
        load_train_config(None, {**base, "training.blocks_to_swap": "2"}), device="cuda"
    )
    transformer, _ = _flux()
    blocks = swapped_blocks(transformer.transformer_blocks, transformer.single_transformer_blocks, 2)
    sizes = [sum(p.numel() * 4 for n, p in b.named_parameters() if "lora_" not in n) for b in blocks]
    assert plain - swapped.parts["weights"] == sum(sizes) - max(sizes)
