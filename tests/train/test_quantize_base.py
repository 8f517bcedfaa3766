"""model.quantize_base = "int8": the frozen denoiser's Linear weights in torchao's int8, the LoRA in float32.

The LoRA's gradients must be those of float32 training on the same (rounded) weights: the reference is the same
model with every quantized Linear replaced by a float32 Linear holding torchao's dequantized weight. (Against the
unrounded model they differ by the weights' rounding, which is the point of int8, not a property of lorafuse.)
Tolerance, per LoRA module: 1e-2 relative, or 10x the module's own float32 noise, whichever is larger. The noise
is measured by computing the reference twice with another thread count (only the summation order changes): in
this random-weight tiny UNet some gradients are sums with heavy cancellation (time_emb_proj's, a spatial sum of
the upstream gradient, change by up to ~3x from the thread count alone), so no fixed tolerance fits them.
Measured: the median module agrees to ~3e-4.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorafuse.errors import UserInputError
from lorafuse.models.load import load_base_pipeline
from lorafuse.train.config import ModelConfig, NetworkConfig, load_train_config
from lorafuse.train.loop import train_lora
from lorafuse.train.network import create_network
from lorafuse.train.quantize import quantize_frozen_base

pytest.importorskip("torchao", reason="the [quantize] extra (torchao) is not installed")


def _dequantized_copy(unet: torch.nn.Module) -> None:
    """Replace each torchao-quantized Linear weight by a plain float32 tensor of the same (rounded) values."""
    for module in unet.modules():
        if isinstance(module, torch.nn.Linear) and type(module.weight).__name__ != "Parameter":
            weight = module.weight.dequantize().float().detach().clone()
            module.weight = torch.nn.Parameter(weight, requires_grad=False)


def load_reference():
    """sd15-tiny holding int8-rounded Linear weights as plain float32 tensors."""
    pipe = load_base_pipeline("sd15-tiny")
    quantize_frozen_base(pipe.unet, "int8")
    _dequantized_copy(pipe.unet)
    return pipe


def _lora_grads(pipe) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    network = create_network(pipe, NetworkConfig(network_dim=4, network_alpha=4, layers="all",
                                                 network_train_unet_only=True), "sd15")  # fmt: skip
    params = network.named_parameters()
    with torch.no_grad():  # B starts at zero: give every factor a gradient path, the same values by name
        for i, name in enumerate(sorted(params)):
            params[name].normal_(std=0.05, generator=torch.Generator().manual_seed(i))
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 77, pipe.text_encoder.config.hidden_size)
    out = pipe.unet(x, torch.tensor([500, 100]), encoder_hidden_states=text).sample
    out.pow(2).mean().backward()
    return {k: p.grad.clone() for k, p in params.items()}


def test_int8_lora_gradients_are_those_of_the_rounded_weights() -> None:
    quantized = load_base_pipeline("sd15-tiny")
    changed = quantize_frozen_base(quantized.unet, "int8")
    assert changed > 10
    reference = load_reference()
    assert not any(type(m.weight).__name__ != "Parameter" for m in reference.unet.modules()
                   if isinstance(m, torch.nn.Linear))  # fmt: skip
    got, want = _lora_grads(quantized), _lora_grads(reference)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        again = _lora_grads(load_reference())
    finally:
        torch.set_num_threads(threads)
    assert got.keys() == want.keys() == again.keys() and len(got) > 10

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    bad = {k: (rel(got[k], want[k]), rel(again[k], want[k])) for k in want
           if rel(got[k], want[k]) > max(1e-2, 10 * rel(again[k], want[k]))}  # fmt: skip
    assert not bad, bad
    assert sorted(rel(got[k], want[k]) for k in want)[len(want) // 2] < 2e-3  # the typical module
    base_linear = next(m for m in quantized.unet.modules() if type(m).__name__ == "TorchaoLoraLinear")
    assert base_linear.base_layer.weight.dtype in (torch.int8, torch.float32)  # torchao's wrapper reports either
    assert type(base_linear.base_layer.weight).__name__ != "Parameter"


def test_int8_base_trains_and_writes_the_usual_lora(train_overrides, tmp_path) -> None:
    cfg = load_train_config(None, train_overrides(**{"model.quantize_base": "int8",
                                                     "training.output_dir": str(tmp_path / "q")}))  # fmt: skip
    result = train_lora(cfg, progress_bar=False)
    plain = train_lora(load_train_config(None, train_overrides(**{"training.output_dir": str(tmp_path / "p")})),
                       progress_bar=False)  # fmt: skip
    assert all(torch.isfinite(torch.tensor(result.losses)))
    quantized, full = load_file(str(result.lora_path)), load_file(str(plain.lora_path))
    assert quantized.keys() == full.keys()
    assert all(v.dtype == full[k].dtype for k, v in quantized.items())
    moved = max(float(v.abs().max()) for k, v in quantized.items() if "lora_up" in k)
    assert moved > 1e-4


def test_fp8_needs_a_cuda_gpu_and_unknown_modes_are_refused() -> None:
    with pytest.raises(Exception, match="quantize_base"):
        ModelConfig("world-random", quantize_base="int4")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: fp8 may be supported here")
    pipe = load_base_pipeline("sd15-tiny")
    with pytest.raises(UserInputError, match="'fp8' needs a CUDA GPU with float8 support"):
        quantize_frozen_base(pipe.unet, "fp8")


def test_kohya_fp8_base_maps_to_quantize_base() -> None:
    from lorafuse.train.kohya_import import convert_flat

    imp = convert_flat({"fp8_base": True}, defaults=False)
    assert imp.data["model"]["quantize_base"] == "fp8" and not imp.refused
    off = convert_flat({"fp8_base": False}, defaults=False)
    assert "model" not in off.data and not off.refused
