"""Files lorafuse trains load where kohya's files load: every key consumed by ComfyUI's loader (re-implemented in
tests/lora/comfy_reference.py), the ΔW it builds equal to the one trained, and each tensor shaped as kohya's own
networks.lora module (LoRAModule) holds it, so kohya's load_state_dict takes it; for float32, fp16 and bf16 files,
LoRA / LoCon (networks.lora) and LyCORIS LoCon / LoHa / LoKr (lycoris.kohya)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from lorafuse.models.tiny import tiny_pipeline
from lorafuse.train.config import NetworkConfig
from lorafuse.train.network import create_network

from .comfy_reference import delta, delta_output, key_map, load

TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # ΔW of two factors rounded once each


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _perturbed(network):
    """Both factors non-zero (training starts with one of them at 0)."""
    with torch.no_grad():
        for p in network.named_parameters().values():
            p.add_(torch.randn_like(p) * 0.05)


def _kohya_module_shapes(tensors, base: torch.nn.Module, name: str) -> None:
    """kohya's LoRAModule: lora_down = Linear(in, r) / Conv2d(in, r, k, stride, padding), lora_up = Linear(r, out)
    / Conv2d(r, out, 1), alpha a 0-d buffer: its load_state_dict needs exactly these shapes."""
    down, up, alpha = (tensors[f"{name}.{p}"] for p in ("lora_down.weight", "lora_up.weight", "alpha"))
    r = down.shape[0]
    if isinstance(base, torch.nn.Linear):
        assert (tuple(down.shape), tuple(up.shape)) == ((r, base.in_features), (base.out_features, r)), name
    else:
        kh, kw = base.kernel_size
        assert tuple(down.shape) == (r, base.in_channels, kh, kw), name
        assert tuple(up.shape) == (base.out_channels, r, 1, 1), name
    assert alpha.dim() == 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lora_and_locon_files_load_in_comfyui_and_kohya(arch, dtype, tmp_path):
    pipe = tiny_pipeline(arch, seed=0)
    torch.manual_seed(0)
    network = create_network(pipe, NetworkConfig(network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1), arch)
    _perturbed(network)
    trained = {
        (comp, path): layer.get_delta_weight(network.adapter).detach().float()
        for comp in network.plan
        for path, layer in network.layers(comp)
    }
    path = network.save(tmp_path / "l.safetensors", arch=arch, base=pipe, training={}, metadata={}, dtype=dtype)
    tensors = _tensors(path)
    assert {t.dtype for t in tensors.values()} == {dtype}
    client = tiny_pipeline(arch, seed=0)  # the base as ComfyUI holds it: no LoRA layers injected
    patches, not_loaded = load(tensors, client)
    assert not not_loaded  # ComfyUI: "lora key not loaded" for each of these
    assert set(patches) == set(trained)  # every trained module, and it alone, is patched
    assert {kind for kind, _, _ in patches.values()} == {"lora"}
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert len(names) == len(patches)
    for (comp, mod_path), (kind, parts, alpha) in patches.items():
        base = getattr(client, comp).get_submodule(mod_path)
        ours = delta(kind, parts, alpha, base.weight.shape)
        ref = trained[(comp, mod_path)]
        assert (ours - ref).abs().max() <= TOL[dtype] * ref.abs().max(), mod_path
    kmap = key_map(client)
    for name in names:
        comp, mod_path = kmap[name]
        _kohya_module_shapes(tensors, getattr(client, comp).get_submodule(mod_path), name)


LYCORIS = [
    ("sd15", "locon", {}),
    ("sd15", "loha", {}),
    ("sd15", "lokr", {"factor": 4}),
    ("sd15", "lokr", {"network_dim": 100000}),  # the kohya_ss GUI's LoKr preset: w2 stored whole, ComfyUI's scale 1
    ("sdxl", "loha", {}),  # SGM names and both text encoders (lora_te1_ / lora_te2_)
    ("sdxl", "lokr", {"factor": 4}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("arch", "algo", "extra"), LYCORIS)
def test_lycoris_files_load_in_comfyui_as_lycoris_applies_them(arch, algo, extra, dtype, tmp_path):
    pytest.importorskip("lycoris", reason="lycoris-lora is not installed (pip install 'lorafuse[lycoris]')")
    pipe = tiny_pipeline(arch, seed=0)
    torch.manual_seed(0)
    cfg = {"network_dim": 4, "network_alpha": 2, "conv_dim": 2, "conv_alpha": 1, **extra}
    network = create_network(pipe, NetworkConfig(network_module="lycoris.kohya", algo=algo, **cfg), arch)
    _perturbed(network)
    path = network.save(tmp_path / "ly.safetensors", arch=arch, base=pipe, training={}, metadata={}, dtype=dtype)
    tensors = _tensors(path)
    client = tiny_pipeline(arch, seed=0)
    patches, not_loaded = load(tensors, client)
    assert not not_loaded
    assert {kind for kind, _, _ in patches.values()} == {"lora" if algo == "locon" else algo}
    modules = list(network._modules())
    assert len(patches) == len(modules)
    if extra.get("network_dim") == 100000:
        assert any("lokr_w2" in parts for _, parts, _ in patches.values())  # whole factors: no alpha scaling
    # the same paths in the training pipeline, whose modules LyCORIS wraps (its names are its own)
    where = {
        id(m): (c, p)
        for c in ("unet", "text_encoder", "text_encoder_2")
        if getattr(pipe, c, None) is not None
        for p, m in getattr(pipe, c).named_modules()
    }
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, module in modules:
            org = module.org_module[0]
            kind, parts, alpha = patches[where[id(org)]]
            ours = delta(kind, parts, alpha, org.weight.shape)
            x, expected = delta_output(org, ours, g)
            applied = org(x) - module.org_forward(x)  # what LyCORIS adds in its forward, from its fp32 weights
            tol = TOL[dtype] * applied.abs().max() + 1e-6
            assert (applied - expected).abs().max() <= tol, module.lora_name
