"""A real client reads our FLUX.1 files: diffusers' own `FluxPipeline.load_lora_weights()` on a tiny FLUX.1.

As for SD (test_lora_diffusers_interop.py), per file: (1) every module of our LoRA becomes a peft LoRA layer in
the pipeline and nothing else does, with no key left over (diffusers logs unexpected keys; none may appear);
(2) each layer's ΔW equals ours; (3) transformer and text-encoder outputs equal those of W + ΔW added directly.

What the kohya file covers. diffusers 0.42 cannot load two parts of a kohya FLUX.1 file on a tiny model, for
reasons of its own: it splits single blocks' `linear1` at FLUX.1's real widths (3072, 12288; checked at that
width in test_flux_lora_files.py) and it drops modules outside the blocks (img_in, final_layer, ...; we warn
when writing them). So the kohya file here holds every other transformer Linear and the text encoder; the
diffusers-format file holds every Linear of both.

Tolerances as in the SD test: ΔW rtol 1e-5 / atol 1e-6 (the same float32 product in another order); outputs
2e-4 of the largest reference magnitude in float32 (the rounding of W + ΔW through the blocks), after checking
that the LoRA moves the output by far more than that.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import pytest
import torch
from peft.tuners.lora import LoraLayer

from lorafuse.lora.io import load_lora, save_lora
from lorafuse.lora.keys import canonical_key
from lorafuse.lora.state import LoraState
from lorafuse.lora.validate import validate_lora

TOL = 2e-4
COMPONENTS = ("transformer", "text_encoder")
_LINEAR1 = (".attn.to_q", ".attn.to_k", ".attn.to_v", ".proj_mlp")
_OUTSIDE_BLOCKS = (
    "transformer.transformer_blocks.",
    "transformer.single_transformer_blocks.",
    "text_encoder.",
)


def _kohya_loadable(key: str) -> bool:
    single_linear1 = key.startswith("transformer.single_transformer_blocks.") and key.endswith(_LINEAR1)
    return key.startswith(_OUTSIDE_BLOCKS) and not single_linear1


def _inputs(pipe) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    cfg = pipe.transformer.config
    tokens, text = 16, 5  # a 4x4 latent grid of packed patches, 5 text tokens
    return {
        "hidden_states": torch.randn(2, tokens, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(2, text, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(2, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.2, 0.9]),
        "guidance": torch.tensor([3.5, 3.5]),
        "img_ids": torch.tensor([[0.0, i, j] for i in range(4) for j in range(4)]),  # (tokens, 3) positions
        "txt_ids": torch.zeros(text, 3),
        "ids": torch.randint(0, pipe.text_encoder.config.vocab_size, (2, 7), generator=g),
    }


def _outputs(components: dict[str, torch.nn.Module], inputs: dict) -> dict[str, torch.Tensor]:
    kwargs = {k: v for k, v in inputs.items() if k != "ids"}
    with torch.no_grad():
        return {
            "transformer": components["transformer"](**kwargs).sample,
            "text_encoder": components["text_encoder"](inputs["ids"]).last_hidden_state,
        }


def _reference(pipe, state: LoraState) -> dict[str, torch.nn.Module]:
    report = validate_lora(state, pipe, arch="flux")
    refs = {c: copy.deepcopy(getattr(pipe, c)) for c in COMPONENTS}
    with torch.no_grad():
        for key, target in report.targets.items():
            weight = refs[target.component].get_submodule(target.path).weight
            weight += state.modules[key].delta_weight(weight.shape)
    return refs


def _lora_layers(pipe) -> dict[str, LoraLayer]:
    return {
        canonical_key(c, name): sub
        for c in COMPONENTS
        for name, sub in getattr(pipe, c).named_modules()
        if isinstance(sub, LoraLayer)
    }


@contextlib.contextmanager
def _diffusers_warnings():
    """diffusers' log records (its logger does not propagate to the root, so pytest's caplog misses them)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_flux_pipeline_loads_our_file_like_w_plus_delta(fmt, tiny_flux, random_lora, tmp_path):
    pipe = tiny_flux(seed=0)
    keep = _kohya_loadable if fmt == "kohya" else (lambda k: k.startswith(("transformer.", "text_encoder.")))
    written = random_lora(pipe, seed=3, ranks=(2, 4, 3), alphas=(1.0, 2.0, None, 3.0), scale=0.3, keep=keep)
    path = save_lora(written, tmp_path / f"ours_{fmt}.safetensors", format=fmt, arch="flux")
    state = load_lora(path, base=pipe)
    assert set(state.modules) == set(written.modules)
    refs = _reference(pipe, state)
    inputs = _inputs(pipe)
    base_out = _outputs({c: getattr(pipe, c) for c in COMPONENTS}, inputs)

    with _diffusers_warnings() as messages:
        pipe.load_lora_weights(str(path))
    leftovers = [m for m in messages if "unexpected keys" in m or "missing keys" in m]
    assert not leftovers, leftovers

    # 1. every module of the file became a LoRA layer, and only those
    layers = _lora_layers(pipe)
    assert set(layers) == set(state.modules)
    # 2. the same ΔW, module by module
    for key, layer in layers.items():
        theirs = layer.get_delta_weight(layer.active_adapters[0]).detach()
        torch.testing.assert_close(theirs, state.modules[key].delta_weight(theirs.shape), rtol=1e-5, atol=1e-6,
                                   msg=key)  # fmt: skip
    # 3. the same outputs as W + ΔW
    ref_out = _outputs(refs, inputs)
    client_out = _outputs({c: getattr(pipe, c) for c in COMPONENTS}, inputs)
    for name, ref in ref_out.items():
        scale = ref.abs().max().item()
        assert (ref - base_out[name]).abs().max().item() > 100 * TOL * scale, f"{name}: the LoRA barely acts"
        err = (client_out[name] - ref).abs().max().item()
        assert err <= TOL * scale, f"{name}: diffusers differs from W + ΔW by {err:.3g}"
