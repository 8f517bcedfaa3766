"""Block swap (`training.blocks_to_swap`, kohya's option for FLUX.1): some transformer blocks' frozen weights live
in host memory, and each comes to the device only while it runs: a forward pre-hook brings it, a forward hook
sends it back, and a block coming to the device sends any other swapped block back (one at a time).

Training needs gradient checkpointing with it. The backward pass computes with the tensors autograd saved in the
forward, views of the weights as they were on the device; those views keep the device copy alive until the
block's backward, whatever `param.data` says by then. Checkpointing saves nothing inside a block in the forward
pass and recomputes the block (through the same hooks) just before its backward, so one swapped block's weights
are on the device at a time. This is also why the gradients are exactly those without swapping: every forward
and backward computes on the block's own weights, moved exactly.
Only frozen weights and buffers move; the LoRA factors are small and stay on the device, so their gradients
and optimizer state never change device. kohya counts blocks as FLUX.1's double-stream blocks weigh about two
single-stream ones: N swaps N // 2 double and 2 (N - N // 2) single blocks, the last ones of each kind.
Why not accelerate's offload hooks: they put weights back on the meta device after each forward, for inference.
Moves are synchronous (kohya overlaps them with compute on a second CUDA stream): the saving is the same, the
speed lower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lorafuse.errors import UserInputError

Move = Callable[[torch.Tensor], torch.Tensor]


def swap_counts(blocks_to_swap: int, n_double: int, n_single: int) -> tuple[int, int]:
    """(double, single) blocks to keep in host memory for kohya's `blocks_to_swap`."""
    double = blocks_to_swap // 2
    single = (blocks_to_swap - double) * 2
    if double > n_double or single > n_single:
        most = max(
            n for n in range(blocks_to_swap + 1) if n // 2 <= n_double and (n - n // 2) * 2 <= n_single
        )
        raise UserInputError(
            f"training.blocks_to_swap = {blocks_to_swap}: that swaps {double} double and {single} single blocks "
            f"(kohya's split), but this transformer has {n_double} and {n_single}; at most {most}"
        )
    return double, single


def frozen_tensors(block: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(module, "_parameters" or "_buffers", name) of every frozen weight and buffer of `block`."""
    return [
        (m, kind, name)
        for m in block.modules()
        for kind in ("_parameters", "_buffers")
        for name, t in getattr(m, kind).items()
        if t is not None and not (kind == "_parameters" and t.requires_grad)
    ]


class BlockSwap:
    """Hooks that keep `blocks`' frozen weights on the host except while each block runs. `to_device` / `to_host`
    move one tensor (default: `.to(device)` and `.to("cpu")`); `events` records (block index, where) moves."""

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device, to_device: Move | None = None,
                 to_host: Move | None = None):  # fmt: skip
        self.blocks = list(blocks)
        self.to_device = to_device or (lambda t: t.to(device, non_blocking=True))
        self.to_host = to_host or (lambda t: t.to("cpu"))
        self.events: list[tuple[int, str]] = []
        self._handles: list = []
        self._where = ["device"] * len(self.blocks)

    def where(self, i: int) -> str:
        return self._where[i]

    def move(self, i: int, where: str) -> None:
        if where == "device":  # one swapped block on the device at a time
            for j, there in enumerate(self._where):
                if j != i and there == "device":
                    self.move(j, "host")
        if self._where[i] == where:
            return
        fn = self.to_device if where == "device" else self.to_host
        for module, kind, name in frozen_tensors(self.blocks[i]):
            t = getattr(module, kind)[name]
            if kind == "_parameters":
                t.data = fn(t.data)  # the same Parameter: autograd's saved references see the moved data
            else:
                getattr(module, kind)[name] = fn(t)
        self._where[i] = where
        self.events.append((i, where))

    def install(self) -> BlockSwap:
        """Send every block to the host and hook it; returns self."""
        for i, block in enumerate(self.blocks):
            self.move(i, "host")

            def to_device(*_, i=i):
                self.move(i, "device")

            def to_host(*_, i=i):
                self.move(i, "host")

            self._handles += [
                block.register_forward_pre_hook(to_device),
                block.register_forward_hook(to_host),
            ]
        return self

    def remove(self) -> None:
        """Unhook, and bring every block back to the device."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for i, block in enumerate(self.blocks):
            if self._where[i] == "host":
                for module, kind, name in frozen_tensors(block):
                    t = getattr(module, kind)[name]
                    if kind == "_parameters":
                        t.data = self.to_device(t.data)
                    else:
                        getattr(module, kind)[name] = self.to_device(t)
                self._where[i] = "device"


def swapped_blocks(
    double: Sequence[nn.Module], single: Sequence[nn.Module], blocks_to_swap: int
) -> list[nn.Module]:
    """The last blocks of each kind, as many as kohya's split of `blocks_to_swap` says."""
    n_double, n_single = swap_counts(blocks_to_swap, len(double), len(single))
    return [*double[len(double) - n_double :], *single[len(single) - n_single :]]


def to_device_except(model: nn.Module, device: torch.device, skip: Sequence[nn.Module]) -> None:
    """`model.to(device)` for every parameter and buffer but the frozen ones of the `skip` blocks (which stay where
    they are), so the swapped blocks never all sit on the device at once; their LoRA factors go."""
    skipped = {id(getattr(m, kind)[name]) for block in skip for m, kind, name in frozen_tensors(block)}
    for m in model.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(m, kind).items():
                if t is None or id(t) in skipped:
                    continue
                if kind == "_parameters":
                    t.data = t.data.to(device)
                else:
                    getattr(m, kind)[name] = t.to(device)
