"""peft injection against an obvious reference: a deep copy of the base with delta_weight() added to its weights."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from peft.tuners.lora import LoraLayer

from lorafuse.errors import LoraFormatError, LorafuseError, UserInputError
from lorafuse.lora import inject as inj
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import base_modules
from lorafuse.models.tiny import tiny_pipeline

ATOL = 1e-5  # float32 through a whole UNet: (W + ΔW)x and Wx + B(Ax) round differently (~2e-6 seen)


@functools.lru_cache(maxsize=2)
def _base(arch: str):
    return tiny_pipeline(arch, seed=0)


def fresh(arch: str):
    return copy.deepcopy(_base(arch))


LINEAR = ("to_q", "to_v", "to_out.0", "ff.net.2", "q_proj", "out_proj", "fc1")
CONV = ("conv1", "conv2", "proj_in", "conv_shortcut", "time_emb_proj")


def make_lora(
    pipe, suffixes=LINEAR, *, seed=0, ranks=(2, 4), alphas=(1.0, None, 3.0), scale=0.1
) -> LoraState:
    """Random non-zero up and down (not the zero-B init) on every module ending in one of `suffixes`."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i, (key, ref) in enumerate(sorted(base_modules(pipe).modules.items())):
        if not key.endswith(tuple(suffixes)):
            continue
        out_f, in_f, *kernel = ref.shape
        r = ranks[i % len(ranks)]
        down = torch.randn((r, in_f, *kernel), generator=g) * scale
        up = torch.randn((out_f, r, *([1, 1] if kernel else [])), generator=g) * scale
        modules[key] = LoraModule(down=down, up=up, alpha=alphas[i % len(alphas)])
    return LoraState(modules=modules)


def module_of(pipe, key: str) -> torch.nn.Module:
    """Resolved here independently of lorafuse's key index: transformers 5 CLIPTextModel has no `text_model.`."""
    component, path = key.split(".", 1)
    root = getattr(pipe, component)
    try:
        return root.get_submodule(path)
    except AttributeError:
        return root.get_submodule(path.removeprefix("text_model."))


def reference(arch: str, *loras: tuple[LoraState, float]):
    ref = fresh(arch)
    with torch.no_grad():
        for state, weight in loras:
            for key, m in state.modules.items():
                w = module_of(ref, key).weight
                w += weight * m.delta_weight(w.shape)
    return ref


def outputs(pipe) -> dict[str, torch.Tensor]:
    """UNet noise prediction and every text encoder's hidden states on fixed inputs (batch 2).

    16x16 latents, not the tiny UNet's default 8x8: SD1.5's fourth level would then be 1x1 pixels, where a
    GroupNorm over 2 numbers amplifies float32 rounding by ~1e4 and no two summation orders agree.
    """
    g = torch.Generator().manual_seed(1)
    unet = pipe.unet
    cross = unet.config.cross_attention_dim
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 64, generator=g),
            "time_ids": torch.randn(2, 6, generator=g),
        }
    x = torch.randn(2, 4, 16, 16, generator=g)
    ehs = torch.randn(2, 6, cross, generator=g)
    ids = torch.randint(0, 40, (2, 7), generator=g)
    with torch.no_grad():
        out = {"unet": unet(x, torch.tensor([10, 700]), ehs, **kwargs).sample}
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                out[name] = getattr(pipe, name)(ids).last_hidden_state
    return out


def assert_close(a: dict, b: dict) -> None:
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def assert_differ(a: dict, b: dict, keys=None) -> None:
    for k in keys or a:
        assert (a[k] - b[k]).abs().max() > 1e-3, f"{k}: the LoRA does not change the output"


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_inject_equals_weights_plus_delta(arch, kind):
    pipe = fresh(arch)
    suffixes = LINEAR if kind == "linear" else LINEAR + CONV
    state = make_lora(pipe, suffixes)
    base = outputs(pipe)
    report = inj.inject_lora(pipe, state, "a")
    assert report.matched == len(state.modules)
    if kind == "conv":
        assert (
            sum(isinstance(m, LoraLayer) and m.lora_A["a"].weight.dim() == 4 for m in pipe.unet.modules()) > 0
        )
    got = outputs(pipe)
    assert_differ(got, base)
    assert_close(got, outputs(reference(arch, (state, 1.0))))


def test_weights_scale_linearly_and_zero_is_base():
    pipe = fresh("sd15")
    state = make_lora(pipe, LINEAR + CONV)
    base = outputs(pipe)
    inj.inject_lora(pipe, state, "a", weight=0.5)
    assert inj.adapter_info(pipe)["a"].weight == pytest.approx(0.5)
    half = outputs(pipe)
    assert_differ(half, base)
    assert_close(half, outputs(reference("sd15", (state, 0.5))))
    inj.set_adapter_weights(pipe, {"a": 0.0})
    zero = outputs(pipe)
    for k in base:
        assert torch.equal(zero[k], base[k]), k


def test_merge_equals_unmerged_and_unmerge_restores_exactly():
    pipe = fresh("sdxl")
    state = make_lora(pipe, LINEAR + CONV)
    inj.inject_lora(pipe, state, "a")
    unmerged = outputs(pipe)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    assert inj.merge_adapters(pipe) == ["a"]
    assert inj.adapter_info(pipe)["a"].merged
    merged = outputs(pipe)
    assert not torch.equal(merged["unet"], unmerged["unet"])  # really went through other arithmetic
    assert_close(merged, unmerged)
    inj.unmerge_adapters(pipe)
    for k, v in pipe.unet.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, weights[k]), k
    after = outputs(pipe)
    for k in unmerged:
        assert torch.equal(after[k], unmerged[k]), k


def test_merge_non_finite_names_the_adapter_and_merges_nothing(monkeypatch):
    pipe = fresh("sd15")
    inj.inject_lora(pipe, make_lora(pipe, ("to_q",)), "good")
    keys = sorted(make_lora(pipe, ("to_k",)).modules)
    huge = LoraState(modules={k: LoraModule(down=torch.full((1, module_of(pipe, k).weight.shape[1]), 1e30),
                                            up=torch.full((module_of(pipe, k).weight.shape[0], 1), 1e30), alpha=1.0)
                              for k in keys})  # fmt: skip
    with pytest.raises(LorafuseError, match=r"to_k: its update is .* times the size of the base weight"):
        inj.inject_lora(pipe, huge, "broken")  # refused where it enters; merge_adapters is the last line
    monkeypatch.setattr("lorafuse.lora.validate.check_against_base", lambda *a: [])
    inj.inject_lora(pipe, huge, "broken")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(LorafuseError, match="adapter 'broken'.*non-finite"):
        inj.merge_adapters(pipe)
    assert not any(layer.merged for layer in pipe.unet.modules() if isinstance(layer, LoraLayer))
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_two_adapters_enable_disable_delete():
    pipe = fresh("sd15")
    a = make_lora(pipe, LINEAR, seed=1, ranks=(2,))
    b = make_lora(pipe, ("to_q", "to_k", "conv1"), seed=2, ranks=(3, 5))
    base = outputs(pipe)
    inj.inject_lora(pipe, a, "a")
    inj.inject_lora(pipe, b, "b", weight=0.7)
    assert inj.enabled_adapters(pipe) == ["a", "b"]
    assert_close(outputs(pipe), outputs(reference("sd15", (a, 1.0), (b, 0.7))))
    inj.disable_adapters(pipe, ["b"])
    assert_close(outputs(pipe), outputs(reference("sd15", (a, 1.0))))
    inj.disable_adapters(pipe)
    off = outputs(pipe)
    for k in base:
        assert torch.equal(off[k], base[k]), k
    inj.enable_adapters(pipe, ["b"])
    assert_close(outputs(pipe), outputs(reference("sd15", (b, 0.7))))
    with pytest.raises(UserInputError, match="unknown adapter"):
        inj.enable_adapters(pipe, ["c"])
    inj.delete_adapter(pipe, "a")
    assert inj.adapter_names(pipe) == ["b"]
    inj.delete_adapter(pipe, "b")
    # every wrapper removed: the module tree and the outputs are the base's again
    assert not any(isinstance(m, LoraLayer) for m in pipe.unet.modules())
    assert [n for n, _ in pipe.unet.named_parameters()] == [
        n for n, _ in _base("sd15").unet.named_parameters()
    ]
    gone = outputs(pipe)
    for k in base:
        assert torch.equal(gone[k], base[k]), k


def test_dense_delta_module_is_injected_exactly():
    """LoHa/LoKr arrive as dense ΔW; injected as an exact-rank SVD factorisation."""
    pipe = fresh("sd15")
    g = torch.Generator().manual_seed(3)
    modules = {}
    for key in (
        "unet.down_blocks.0.resnets.0.conv1",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    ):
        shape = module_of(pipe, key).weight.shape
        # a rank-3 ΔW as LoHa-like dense tensor
        delta = (
            torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1:].numel(), generator=g)
        ).reshape(shape)
        modules[key] = LoraModule(delta=0.1 * delta)
    state = LoraState(modules=modules)
    base = outputs(pipe)
    inj.inject_lora(pipe, state, "dense")
    assert module_of(pipe, "unet.down_blocks.0.resnets.0.conv1").r["dense"] == 3
    got = outputs(pipe)
    assert_differ(got, base, ["unet"])
    assert_close(got, outputs(reference("sd15", (state, 1.0))))


def test_per_sample_adapters_equal_separate_forwards():
    pipe = fresh("sd15")
    inj.inject_lora(pipe, make_lora(pipe, LINEAR + CONV, seed=4), "a")
    inj.inject_lora(pipe, make_lora(pipe, ("to_k", "proj_in"), seed=5), "b", weight=0.5)
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ehs = torch.randn(2, 6, 32, generator=g)
    t = torch.tensor([500, 500])

    def single(i: int, name: str) -> torch.Tensor:
        inj.set_enabled_adapters(pipe, [] if name == inj.BASE else [name])
        with torch.no_grad():
            return unet(x[i : i + 1], t[i : i + 1], ehs[i : i + 1]).sample

    for names in (["a", inj.BASE], ["b", "a"]):
        with torch.no_grad(), inj.per_sample_adapters(unet, names):
            batched = unet(x, t, ehs).sample
        separate = [single(i, n) for i, n in enumerate(names)]
        for i, n in enumerate(names):
            if n != inj.BASE:  # the adapter really acts on its sample
                assert (separate[i] - single(i, inj.BASE)).abs().max() > 1e-3
        torch.testing.assert_close(batched, torch.cat(separate), atol=ATOL, rtol=1e-4)
    inj.set_enabled_adapters(pipe, ["a"])
    with torch.no_grad():  # the hooks are gone after the block: adapter a on both samples
        plain = unet(x, t, ehs).sample
    torch.testing.assert_close(plain[1:], single(1, "a"), atol=ATOL, rtol=1e-4)
    assert inj.cfg_adapter_names(2, "a") == [inj.BASE, inj.BASE, "a", "a"]
    with pytest.raises(UserInputError, match="unknown adapter"), inj.per_sample_adapters(unet, ["a", "zzz"]):
        pass


def test_no_matching_key_is_an_error_and_leaves_the_pipeline_untouched():
    pipe = fresh("sd15")
    state = LoraState(modules={"unet.nowhere.to_q": LoraModule(down=torch.ones(1, 4), up=torch.ones(4, 1))})
    with pytest.raises(LoraFormatError, match="match no module"):
        inj.inject_lora(pipe, state, "a")
    assert inj.adapter_names(pipe) == []
    assert not any(isinstance(m, LoraLayer) for m in pipe.unet.modules())


def test_names_and_merged_state_are_checked():
    pipe = fresh("sd15")
    state = make_lora(pipe, ("to_q",))
    inj.inject_lora(pipe, state, "a")
    with pytest.raises(UserInputError, match="already exists"):
        inj.inject_lora(pipe, state, "a")
    with pytest.raises(UserInputError, match="invalid adapter name"):
        inj.inject_lora(pipe, state, inj.BASE)
    inj.merge_adapters(pipe)
    with pytest.raises(UserInputError, match="unmerge_adapters"):
        inj.set_adapter_weights(pipe, {"a": 0.3})
    with pytest.raises(UserInputError, match="unmerge"), inj.per_sample_adapters(pipe.unet, ["a", "a"]):
        pass


def test_pipeline_call_with_adapters_and_asymmetric_cfg():
    """A whole denoising run: the adapter acts, weight 0 is the base, and CFG halves can differ per sample."""
    pipe = fresh("sd15")
    pipe.set_progress_bar_config(disable=True)

    def run() -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return pipe(
            "a photo of a dog", num_inference_steps=2, guidance_scale=5.0, generator=g, output_type="latent"
        ).images

    base = run()
    inj.inject_lora(pipe, make_lora(pipe, LINEAR + CONV), "a")
    both = run()
    assert (both - base).abs().max() > 1e-3
    # (B) prompts -> (2B) UNet batch, uncond half first: the LoRA only on the conditional half
    with inj.per_sample_adapters(pipe.unet, inj.cfg_adapter_names(1, "a")):
        cond_only = run()
    assert (cond_only - base).abs().max() > 1e-3 and (cond_only - both).abs().max() > 1e-3
    inj.set_adapter_weights(pipe, {"a": 0.0})
    assert torch.equal(run(), base)
