"""The frozen base's Linear weights stored in 8 bits while a LoRA trains on it (`model.quantize_base`).

int8: torchao's weight-only int8 (per-output-channel scales; activations stay in the compute dtype). peft wraps
each quantized Linear in its torchao LoRA layer, so the LoRA factors stay float32 and train as usual. We chose
torchao over optimum-quanto because peft dispatches torchao-quantized layers itself (quanto layers it cannot
wrap), and because its LoRA gradients are exact for the quantized weights: on sd15-tiny they match, within
0.3 % (largest module), the float32 gradients of a model holding the same dequantized weights
(tests/train/test_quantize_base.py). What differs from float32 training is only the weights' rounding.
fp8: torchao's float8 weight-only storage, on CUDA GPUs with float8 support (compute capability 8.9+); kohya's
`fp8_base`. Convolutions, norms and the text encoders stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafuse.errors import UserInputError
from lorafuse.utils.extras import require

QUANTIZE_MODES = ("none", "int8", "fp8")


def quantize_frozen_base(denoiser: nn.Module, mode: str) -> int:
    """Store `denoiser`'s Linear weights in `mode` in place, before the LoRA is injected; returns how many
    layers changed. "none" leaves it untouched."""
    if mode == "none":
        return 0
    quantization = require("torchao.quantization", f"model.quantize_base = {mode!r}")

    if mode == "fp8":
        device = next(denoiser.parameters()).device
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise UserInputError(
                "model.quantize_base = 'fp8' needs a CUDA GPU with float8 support (compute capability 8.9+, "
                f"e.g. an RTX 4090 or H100); the base is on {device}. Use 'int8', which runs everywhere"
            )
    count = sum(isinstance(m, nn.Linear) for m in denoiser.modules())
    config = quantization.Int8WeightOnlyConfig() if mode == "int8" else quantization.Float8WeightOnlyConfig()
    quantization.quantize_(denoiser, config)
    return count
