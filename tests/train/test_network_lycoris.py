"""network_module = lycoris.kohya: LoCon, LoHa and LoKr trained with lycoris-lora; the files carry kohya's module
names (as A1111 / ComfyUI expect) and our reader rebuilds exactly the ΔW LyCORIS trained."""

from __future__ import annotations

import pytest
import torch
from tests.lora.comfy_reference import delta_output

from lorafuse.lora.io import load_lora, read_tensors
from lorafuse.lora.validate import validate_lora
from lorafuse.models.tiny import tiny_pipeline
from lorafuse.train.config import NetworkConfig
from lorafuse.train.network import create_network
from lorafuse.train.network_lycoris import LycorisNetwork

pytest.importorskip("lycoris", reason="lycoris-lora is not installed (pip install 'lorafuse[lycoris]')")

PARTS = {"locon": "lora_down.weight", "loha": "hada_w1_a", "lokr": "lokr_w1"}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_lycoris_file_reads_back_as_the_trained_delta(arch, algo, tmp_path):
    pipe = tiny_pipeline(arch, seed=0)
    torch.manual_seed(0)
    net_cfg = NetworkConfig(
        network_module="lycoris.kohya", algo=algo, network_dim=4, network_alpha=2, conv_dim=2
    )
    network = create_network(pipe, net_cfg, arch)
    assert isinstance(network, LycorisNetwork) and "unet" in network.plan and "text_encoder" in network.plan
    with torch.no_grad():  # LyCORIS zero-initialises one factor; make every update non-zero
        for p in network.named_parameters().values():
            p.add_(torch.randn_like(p) * 0.05)
    path = network.save(tmp_path / "ly.safetensors", arch=arch, base=pipe, training={}, metadata={},
                        dtype=torch.float32)  # fmt: skip
    tensors, meta = read_tensors(path)
    assert meta["ss_network_module"] == "lycoris.kohya" and f'"algo": "{algo}"' in meta["ss_network_args"]
    assert any(k.endswith(PARTS[algo]) for k in tensors)
    assert any(
        k.startswith("lora_te_text_model_encoder_layers_0") or k.startswith("lora_te1_text_model")
        for k in tensors
    )
    if arch == "sdxl":
        assert any(
            k.startswith("lora_unet_input_blocks_") for k in tensors
        )  # kohya's SGM names, as its SDXL files

    state = load_lora(path, base=pipe)
    report = validate_lora(state, pipe, arch=arch)
    assert not report.warnings and len(state.modules) == sum(len(v) for v in network.plan.values())
    # What LyCORIS adds in its forward, x -> module(x) - base(x), must be x through our reader's ΔW.
    g = torch.Generator().manual_seed(1)
    checked = 0
    with torch.no_grad():
        for _, module in network._modules():
            org = module.org_module[0]
            key = next(
                k
                for k, t in report.targets.items()
                if getattr(pipe, t.component).get_submodule(t.path) is org
            )
            ours = state.modules[key].delta_weight(tuple(org.weight.shape))
            x, expected = delta_output(org, ours, g)
            applied = org(x) - module.org_forward(x)
            torch.testing.assert_close(applied, expected, rtol=1e-4, atol=1e-5, msg=key)
            checked += 1
    assert checked == len(state.modules)
