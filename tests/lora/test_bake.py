"""lorafuse bake: the saved folder is the base with W + Σ w ΔW in its weights, loadable by plain diffusers."""

import torch
from diffusers import DiffusionPipeline

from lorafuse.cli.main import main
from lorafuse.fusion.synthetic import random_lora
from lorafuse.lora.io import save_lora
from lorafuse.models.tiny import tiny_pipeline


def test_bake_writes_w_plus_weighted_deltas(tmp_path):
    base = tiny_pipeline("sd15")  # the same weights `load_base_pipeline("sd15-tiny")` builds
    a, b = random_lora(base, seed=1), random_lora(base, seed=2, rank=2)
    save_lora(a, tmp_path / "a.safetensors", arch="sd15")
    save_lora(b, tmp_path / "b.safetensors", arch="sd15")
    out = tmp_path / "baked"
    assert main(["bake", "--base", "sd15-tiny", "--lora", str(tmp_path / "a.safetensors"), "0.5",
                 "--lora", str(tmp_path / "b.safetensors"), "--out", str(out)]) == 0  # fmt: skip
    baked = DiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert set(a.modules) == set(b.modules)  # both on every attention projection
    key = sorted(k for k in a.modules if k.endswith("attn2.to_k"))[0]  # 'unet.<module path>'
    path = key.removeprefix("unet.")
    module = base.unet.get_submodule(path)
    w = module.weight.detach()
    want = w + 0.5 * a.modules[key].delta_weight(tuple(w.shape)) + b.modules[key].delta_weight(tuple(w.shape))
    got = baked.unet.get_submodule(path).weight.detach()
    assert not torch.allclose(got, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (out / "lorafuse_bake.json").exists() and not (tmp_path / "baked.tmp").exists()


def test_bake_refuses_an_existing_folder_and_a_bad_weight(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    lora = tmp_path / "a.safetensors"
    save_lora(random_lora(tiny_pipeline("sd15"), seed=1), lora, arch="sd15")
    assert main(["bake", "--base", "sd15-tiny", "--lora", str(lora), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["bake", "--base", "sd15-tiny", "--lora", str(lora), "x", "--out", str(tmp_path / "n")]) == 2
    assert "must be a number" in capsys.readouterr().err
