"""CPU-offloaded gradient checkpointing (`training.cpu_offload_checkpointing`, kohya's option of that name).

Plain checkpointing keeps, per checkpointed block, only the block's inputs and recomputes the rest in the
backward pass; at FLUX.1 size those inputs (the image and text token states before each of 57 blocks) are what
is left on the GPU. Offloaded checkpointing keeps them in host memory instead:

    forward   block inputs -> host copies; the checkpoint holds the copies; the block runs on device copies
    backward  the checkpoint recomputes the block from its host copies, moved back to the device
and every other tensor autograd saves outside the checkpointed blocks goes to host memory too
(`torch.autograd.graph.save_on_cpu` around the denoiser's forward). The copies are exact, so gradients are
plain checkpointing's up to the order of float32 sums (an input several blocks share gets each block's gradient
through its own copy); the price is two host<->device copies per block and step. kohya moves the
block outputs to the host inside its FLUX blocks; diffusers lets a model take a checkpointing function
(`enable_gradient_checkpointing(gradient_checkpointing_func=...)`), so here the function does it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_map


@dataclass(frozen=True)
class Offload:
    """Where checkpointed inputs wait: `to_host` makes the held copy, `to_device` brings it back (both must be
    exact and differentiable). The defaults move tensors to host memory and back to `device`."""

    device: torch.device
    to_host: Callable[[torch.Tensor], torch.Tensor] | None = None
    to_device: Callable[[torch.Tensor], torch.Tensor] | None = None

    def host(self, t: torch.Tensor) -> torch.Tensor:
        return self.to_host(t) if self.to_host is not None else t.to("cpu", non_blocking=True)

    def back(self, t: torch.Tensor) -> torch.Tensor:
        return self.to_device(t) if self.to_device is not None else t.to(self.device, non_blocking=True)


def offloaded_checkpoint(offload: Offload) -> Callable:
    """A diffusers `gradient_checkpointing_func`: `(block, *args) -> block(*args)`, checkpointed, with the
    inputs the checkpoint holds kept where `offload` says."""

    def tensors(fn: Callable, args: tuple) -> tuple:
        return tree_map(lambda a: fn(a) if isinstance(a, torch.Tensor) else a, args)

    def checkpointed(block: nn.Module, *args, **kwargs):
        def run(*held):  # runs in the forward pass and again, from the held copies, in the backward pass
            return block(*tensors(offload.back, held), **kwargs)

        return torch.utils.checkpoint.checkpoint(run, *tensors(offload.host, args), use_reentrant=False)

    return checkpointed


def enable_checkpointing(denoiser: nn.Module, offload: Offload | None) -> None:
    """diffusers' gradient checkpointing on `denoiser`, its block inputs held in host memory when `offload`."""
    if offload is None:
        denoiser.enable_gradient_checkpointing()
    else:
        denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=offloaded_checkpoint(offload))


def enable_text_encoder_checkpointing(te: nn.Module, enable: bool = True) -> None:
    """transformers' gradient checkpointing on a text encoder (a training with a text-encoder LoRA turns it on for
    every text encoder, frozen ones too), or off."""
    # non-reentrant: the reentrant variant passes no gradient to LoRA layers whose inputs need none
    kwargs = {"use_reentrant": False}
    renamed = hasattr(te, "activation_checkpointing_enable")  # transformers 5 renamed it
    if not enable:
        (te.activation_checkpointing_disable if renamed else te.gradient_checkpointing_disable)()
    elif renamed:
        te.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def saved_on_host(device: torch.device) -> Iterator[None]:
    """Tensors autograd saves in the denoiser's forward (outside checkpointed blocks) wait in host memory; on a CPU
    device this is nothing (they are already there, and save_on_cpu would copy each)."""
    if device.type == "cpu":
        yield
        return
    with torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda"):
        yield
