"""CPU-offloaded gradient checkpointing: the gradients of plain checkpointing, and the checkpoints really held
where the offload puts them.

On a CPU the default offload (to host memory) moves nothing, so the mechanism is also run with a stand-in host:
float64 copies (fp32 -> fp64 -> fp32 is exact, and the dtype shows which copy a block was recomputed from)."""

from __future__ import annotations

import pytest
import torch
from tests.flux_disk import flux_forward

from lorafuse.errors import UserInputError
from lorafuse.models.load import load_base_pipeline
from lorafuse.train.config import NetworkConfig, load_train_config
from lorafuse.train.loop import train_lora
from lorafuse.train.network import create_network
from lorafuse.train.offload import Offload, enable_checkpointing, saved_on_host


def _lora_grads(base: str, offload: Offload | None, checkpointing: bool = True) -> dict[str, torch.Tensor]:
    """Gradients of a non-zero LoRA on the base's denoiser for one fixed input, with the given checkpointing."""
    torch.manual_seed(0)
    pipe = load_base_pipeline(base)
    family_denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    network = create_network(pipe, NetworkConfig(network_train_unet_only=True), None)
    for name, p in network.named_parameters().items():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # B = 0 would make every gradient but B's zero
    family_denoiser.train()
    if checkpointing:
        enable_checkpointing(family_denoiser, offload)
    if hasattr(pipe, "transformer"):
        out = flux_forward(family_denoiser)
    else:
        cfg, g = family_denoiser.config, torch.Generator().manual_seed(1)
        x = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
        text = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
        out = family_denoiser(x, torch.tensor([10, 500]), text).sample
    with saved_on_host(torch.device("cpu")):
        out.pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in network.named_parameters().items()}


@pytest.mark.parametrize("base", ["world-random", "flux-tiny"])
def test_offloaded_checkpointing_gives_the_gradients_of_plain_checkpointing(base):
    plain = _lora_grads(base, None)
    assert any(g.abs().sum() > 0 for g in plain.values())
    held: list[torch.dtype] = []

    def back(t: torch.Tensor) -> torch.Tensor:
        held.append(t.dtype)
        return t.float()

    # host memory is where CPU tensors already are: nothing moves, and the gradients are bit-identical
    same = _lora_grads(base, Offload(torch.device("cpu")))
    assert all(torch.equal(same[name], plain[name]) for name in plain)
    # real copies: a gradient reaching an input that several blocks share is summed per copy first, so only the
    # order of float32 sums differs (as on a GPU, where the host copies are real)
    stand_in = _lora_grads(base, Offload(torch.device("cpu"), to_host=lambda t: t.double(), to_device=back))
    assert stand_in.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(stand_in[name], plain[name], rtol=1e-5, atol=1e-9)
    # every block ran from the held copies, in the forward pass and again when recomputed
    assert held and set(held) == {torch.float64}
    none = _lora_grads(base, None, checkpointing=False)
    for name in plain:
        torch.testing.assert_close(none[name], plain[name], rtol=1e-5, atol=1e-7)


def test_training_with_offload_matches_plain_checkpointing(train_overrides):
    losses = []
    for offload in ("false", "true"):
        cfg = load_train_config(None, train_overrides(**{
            "training.gradient_checkpointing": "true", "training.cpu_offload_checkpointing": offload,
            "training.max_train_steps": 2, "training.logging": "none",
            "training.output_name": f"run_{offload}",
        }))  # fmt: skip
        losses.append(train_lora(cfg, progress_bar=False).losses)
    assert losses[0] == losses[1]


def test_offload_needs_checkpointing_and_imports_from_kohya(train_overrides):
    with pytest.raises(UserInputError, match="cpu_offload_checkpointing.*needs gradient_checkpointing"):
        load_train_config(None, train_overrides(**{"training.cpu_offload_checkpointing": "true"}))
    from lorafuse.train.kohya_import import convert_flat

    for flat in (
        {"cpu_offload_checkpointing": True},
        {"cpu_offload_checkpointing": "true", "gradient_checkpointing": False},
    ):
        training = convert_flat(flat).data["training"]  # kohya turns checkpointing on with it
        assert training == {"cpu_offload_checkpointing": True, "gradient_checkpointing": True}, flat
    assert convert_flat({"gradient_checkpointing": True}).data["training"] == {"gradient_checkpointing": True}
