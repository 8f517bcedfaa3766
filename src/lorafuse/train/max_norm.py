"""kohya's scale_weight_norms: max-norm regularisation (Srivastava et al. 2014, "Dropout", §5.1) applied to each
LoRA update. After every optimizer step, a module whose ΔW = (alpha / r)·B·A has a Frobenius norm above max_norm gets
A and B each multiplied by √(max_norm / norm), so that its ΔW has norm max_norm (kohya's
apply_max_norm_regularization, networks.lora)."""

from __future__ import annotations

import torch


@torch.no_grad()
def apply_max_norm(network, max_norm: float) -> int:
    """Rescale the LoRA factors of `network` (a LoraNetwork) in place; returns how many modules were scaled."""
    scaled = 0
    for comp in network.plan:
        for _, layer in network.layers(comp):
            norm = layer.get_delta_weight(network.adapter).float().norm().clamp(min=max_norm / 2)
            ratio = torch.clamp(norm, max=max_norm) / norm
            if ratio < 1:
                root = ratio.sqrt()
                layer.lora_A[network.adapter].weight.mul_(root.to(layer.lora_A[network.adapter].weight.dtype))
                layer.lora_B[network.adapter].weight.mul_(root.to(layer.lora_B[network.adapter].weight.dtype))
                scaled += 1
    return scaled
