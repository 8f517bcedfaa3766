"""The trainable LoRA: kohya's rank / alpha rules, and an export that is exactly what the peft layers compute."""

from __future__ import annotations

import copy

import pytest
import torch

from lorafuse.errors import UserInputError
from lorafuse.lora.io import load_lora, save_lora
from lorafuse.lora.validate import validate_lora
from lorafuse.models.load import world_random_pipeline
from lorafuse.models.tiny import tiny_pipeline
from lorafuse.train.cache import text_embeddings
from lorafuse.train.config import NetworkConfig
from lorafuse.train.network import block_labels, create_network, plan_network


def _randomise_up(network, seed: int = 0) -> None:
    # peft starts B at zero (ΔW = 0); a random B makes every layer matter, so a wrong export cannot pass
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters().items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _merge_into(components: dict, state) -> None:
    """Slow reference: W += ΔW for every module of the exported state, found via validate_lora."""
    report = validate_lora(state, components, arch="sdxl" if "text_encoder_2" in components else "sd15")
    with torch.no_grad():
        for key, ref in report.targets.items():
            module = components[ref.component].get_submodule(ref.path)
            module.weight += state.modules[key].delta_weight(module.weight.shape)


def _unet_out(unet, arch: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if arch == "sdxl":
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 64, generator=g),
            "time_ids": torch.rand(2, 6, generator=g) * 64,
        }
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), ehs, **kw).sample


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_export_equals_the_peft_forward(arch):
    pipe = tiny_pipeline(arch)
    names = ["unet", "text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    base = {n: copy.deepcopy(getattr(pipe, n)) for n in names}
    torch.manual_seed(0)
    network = create_network(
        pipe, NetworkConfig(network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=3, layers="all")
    )
    assert torch.equal(_unet_out(pipe.unet, arch), _unet_out(base["unet"], arch))  # B = 0: the base exactly
    _randomise_up(network)
    lora_out = _unet_out(pipe.unet, arch)
    assert not torch.allclose(lora_out, _unet_out(base["unet"], arch), atol=1e-3)
    state = network.to_lora_state()
    _merge_into(base, state)
    torch.testing.assert_close(lora_out, _unet_out(base["unet"], arch), atol=1e-5, rtol=1e-4)
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if arch == "sdxl" else [])
    tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    with torch.no_grad():
        ours = text_embeddings(tokenizers, tes, ["a photo of a sks dog"])
        ref = text_embeddings(tokenizers, [base[n] for n in names[1:]], ["a photo of a sks dog"])
    for key in ours:
        torch.testing.assert_close(ours[key], ref[key], atol=1e-5, rtol=1e-4)


def test_ranks_and_alphas_follow_kohyas_rules():
    pipe = world_random_pipeline()
    net = NetworkConfig(
        network_dim=8, network_alpha=4, conv_dim=2, layers="default", network_train_unet_only=True
    )
    plan = plan_network(pipe, net, "world")["unet"]
    # default + conv_dim is LoCon: resnet 3x3 convs come in with conv_dim and kohya's conv_alpha 1
    conv = {p: ra for p, ra in plan.items() if p.endswith(("conv1", "conv2"))}
    assert conv and set(conv.values()) == {(2, 1.0)}
    linear = {p: ra for p, ra in plan.items() if p.endswith(("to_q", "proj_in", "time_emb_proj"))}
    assert linear and set(linear.values()) == {(8, 4.0)}


def test_block_dims_per_kohya_block():
    pipe = world_random_pipeline()
    labels = block_labels(pipe.unet)
    assert labels == [f"IN{i:02d}" for i in range(6)] + ["MID"] + [f"OUT{i:02d}" for i in range(6)]
    dims = [4] * len(labels)
    dims[labels.index("IN04")] = 0  # down_blocks.1's downsampler: nothing of `default` is there
    dims[labels.index("IN03")] = 0  # down_blocks.1.resnets.0 / attentions.0: dropped
    dims[labels.index("OUT02")] = 16  # up_blocks.1.*.0 (2 layers per world up block: 1·2 + 0)
    alphas = [1.0] * len(labels)
    alphas[labels.index("MID")] = 8.0
    net = NetworkConfig(block_dims=tuple(dims), block_alphas=tuple(alphas), network_train_unet_only=True)
    plan = plan_network(pipe, net, "world")["unet"]
    assert not any(p.startswith("down_blocks.1.attentions.0") for p in plan)
    assert {plan[p][0] for p in plan if p.startswith("up_blocks.1.attentions.0.")} == {16}
    assert {plan[p][1] for p in plan if p.startswith("mid_block.")} == {8.0}
    with pytest.raises(UserInputError, match="has 3 entries, this world UNet has 13 blocks"):
        plan_network(pipe, NetworkConfig(block_dims=(1, 2, 3)), "world")


def test_text_encoder_targets_and_kohya_names(tmp_path):
    pipe = tiny_pipeline("sdxl")
    torch.manual_seed(0)
    network = create_network(pipe, NetworkConfig(layers="attn"))
    layers = pipe.text_encoder.config.num_hidden_layers
    assert network.num_modules("text_encoder") == network.num_modules("text_encoder_2") == 6 * layers
    path = save_lora(network.to_lora_state(), tmp_path / "x.safetensors", arch="sdxl", base=pipe)
    loaded = load_lora(path)
    names = set(loaded.source_names.values())
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in names
    assert any(n.startswith("lora_unet_output_blocks_") for n in names)  # SDXL: kohya's SGM block names


def test_state_dict_round_trip_and_mismatch():
    pipe = world_random_pipeline()
    torch.manual_seed(0)
    network = create_network(pipe, NetworkConfig(layers="attn", network_train_unet_only=True))
    _randomise_up(network)
    saved = {k: v.clone() for k, v in network.state_dict().items()}
    _randomise_up(network, seed=1)
    network.load_state_dict(saved, "s.safetensors")
    assert all(torch.equal(network.state_dict()[k], v) for k, v in saved.items())
    with pytest.raises(UserInputError, match="does not fit this network"):
        network.load_state_dict(dict(list(saved.items())[1:]), "s.safetensors")


def test_only_lora_parameters_train():
    pipe = world_random_pipeline()
    network = create_network(pipe, NetworkConfig(layers="blora_content"))
    trainable = {id(p) for p in network.named_parameters().values()}
    for module in (pipe.unet, pipe.text_encoder):
        for p in module.parameters():
            assert p.requires_grad == (id(p) in trainable)
    assert all(p.dtype == torch.float32 for p in network.named_parameters().values())
