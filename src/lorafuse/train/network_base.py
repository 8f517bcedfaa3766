"""What every trainable network (peft LoRA, LyCORIS) gives the training loop besides its parameters: module
counts and a resumable state. Each network names its parameters its own way (`named_parameters`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lorafuse.errors import UserInputError


class TrainableNetwork:
    plan: dict[str, dict]  # component -> the modules trained in it

    def named_parameters(self, component: str | None = None) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def num_modules(self, component: str) -> int:
        return len(self.plan.get(component, {}))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.named_parameters().items()}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Copy saved parameters in; the names must be exactly this network's (same layers, same ranks)."""
        own = self.named_parameters()
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or extra:
            raise UserInputError(
                f"{source}: the saved LoRA does not fit this network ({len(missing)} parameters missing, "
                f"{len(extra)} unexpected, e.g. {(missing or extra)[0]}); resume with the network settings it was "
                "trained with"
            )
        with torch.no_grad():
            for name, param in own.items():
                if tuple(tensors[name].shape) != tuple(param.shape):
                    raise UserInputError(
                        f"{source}: {name} has shape {tuple(tensors[name].shape)}, the network needs "
                        f"{tuple(param.shape)}"
                    )
                param.copy_(tensors[name])
