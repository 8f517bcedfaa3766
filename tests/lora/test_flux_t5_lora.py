"""T5-XXL LoRAs in FLUX.1 files: kohya's `lora_te3_` and ComfyUI's `text_encoders.t5xxl.transformer.` names.

kohya's lora_flux trains T5 when asked (`train_t5xxl`) and names its modules `lora_te3_<T5EncoderModel path>`;
ComfyUI saves them under `text_encoders.t5xxl.transformer.`. diffusers 0.42 filters T5 keys out of such files, so
the reference here is the module itself: the prompt embedding of a T5 with the LoRA fused by hand.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lorafuse.lora.inject import inject_lora
from lorafuse.lora.io import load_lora, save_lora
from lorafuse.lora.validate import validate_lora


def _t5_refs(pipe):
    from lorafuse.lora.targets import base_modules

    return {k: r for k, r in base_modules(pipe).modules.items() if r.component == "text_encoder_2"}


def _t5_file(pipe, naming: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """A LoRA on every T5 Linear, named as kohya or ComfyUI writes it; also {T5 path: (down, up, alpha)}."""
    g = torch.Generator().manual_seed(seed)
    tensors, truth = {}, {}
    for ref in _t5_refs(pipe).values():
        down = torch.randn(2, ref.shape[1], generator=g) * 0.1
        up = torch.randn(ref.shape[0], 2, generator=g) * 0.1
        if naming == "kohya":
            name = "lora_te3_" + ref.path.replace(".", "_")
            tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
            tensors[f"{name}.alpha"] = torch.tensor(1.0)
        else:
            name = "text_encoders.t5xxl.transformer." + ref.path
            tensors |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up, f"{name}.alpha": torch.tensor(1.0)}
        truth[ref.path] = (down, up, 1.0)
    # a transformer module too, so the file is a whole FLUX.1 LoRA and not only its T5 part
    name = "lora_unet_double_blocks_0_img_attn_proj" if naming == "kohya" else "diffusion_model.double_blocks.0.img_attn.proj"
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    down_key, up_key = ("lora_down", "lora_up") if naming == "kohya" else ("lora_A", "lora_B")
    tensors[f"{name}.{down_key}.weight"] = torch.randn(2, width, generator=g) * 0.1
    tensors[f"{name}.{up_key}.weight"] = torch.randn(width, 2, generator=g) * 0.1
    tensors[f"{name}.alpha"] = torch.tensor(1.0)
    return tensors, truth


def _t5_embedding(pipe, prompt: str = "a sks dog") -> torch.Tensor:
    ids = pipe.tokenizer_2(prompt, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder_2(ids)[0]


@pytest.mark.parametrize("naming", ["kohya", "comfyui"])
def test_t5_lora_is_read_and_applied_as_fused_by_hand(naming, tiny_flux, tmp_path):
    pipe = tiny_flux()
    tensors, truth = _t5_file(pipe, naming)
    path = tmp_path / f"{naming}.safetensors"
    save_file(tensors, path)
    state = load_lora(path)
    assert len([k for k in state.modules if k.startswith("text_encoder_2.")]) == len(truth)
    validate_lora(state, pipe, arch="flux")

    reference = tiny_flux()  # the same seed: the same weights, fused by hand
    with torch.no_grad():
        for module_path, (down, up, alpha) in truth.items():
            layer = reference.text_encoder_2.get_submodule(module_path)
            layer.weight += (up @ down) * (alpha / down.shape[0])
    expected = _t5_embedding(reference)

    inject_lora(pipe, state, "t5", 1.0)
    got = _t5_embedding(pipe)
    assert not torch.allclose(got, _t5_embedding(tiny_flux()), atol=1e-4)  # the LoRA changes the embedding
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_t5_lora_round_trips_through_our_kohya_file(tiny_flux, tmp_path, assert_same_lora):
    pipe = tiny_flux()
    tensors, _ = _t5_file(pipe, "kohya", seed=1)
    save_file(tensors, tmp_path / "in.safetensors")
    state = load_lora(tmp_path / "in.safetensors")
    out = save_lora(state, tmp_path / "out.safetensors", arch="flux")
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_te3_encoder_block_0_") for k in keys)  # kohya's own T5 names
    assert_same_lora(state, load_lora(out))
