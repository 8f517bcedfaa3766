"""NP-LoRA against a dense slow reference, its μ = 0 limit (direct merge) and the stated projection proportion,
on tiny SD1.5, tiny SDXL and the random-weight world model. LoRAs have random non-zero up AND down."""

from __future__ import annotations

import pytest
import torch

from lorafuse.errors import UserInputError
from lorafuse.fusion.registry import get_method, make_config
from lorafuse.fusion.sampling import sample
from lorafuse.lora.merge import fuse_into, merge_loras, unfuse
from lorafuse.lora.state import LoraModule, LoraState
from lorafuse.lora.targets import base_modules, components_of

PROMPT = "a red car in watercolor style"


@pytest.fixture(params=["sd15", "sdxl", "world"])
def base(request: pytest.FixtureRequest):
    return request.getfixturevalue(request.param)


def make_lora(pipe, seed: int, keep=lambda key: True, ranks=(2, 3), scale: float = 0.2) -> LoraState:
    """Random LoRA on the UNet modules `keep` accepts: 3x3 convs get LoCon, alphas alternate None / 2."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i, (key, ref) in enumerate(sorted(base_modules(pipe).modules.items())):
        if not key.startswith("unet.") or not keep(key):
            continue
        r = ranks[i % len(ranks)]
        out_f, in_f, *kernel = ref.shape
        down = torch.randn((r, in_f, *kernel), generator=g) * scale
        up = torch.randn((out_f, r, *([1, 1] if kernel else [])), generator=g) * scale
        modules[key] = LoraModule(down=down, up=up, alpha=None if i % 2 else 2.0)
    return LoraState(modules=modules)


def render(pipe) -> torch.Tensor:
    return sample(pipe, PROMPT, steps=2, seed=0, output="latent", progress=False).latents


def weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.clone()
        for name, root in components_of(pipe).items()
        for key, value in root.state_dict().items()
    }


def plan_for(pipe, content, style, **options):
    return get_method("nplora")().plan(pipe, content, style, make_config("nplora", **options))


def dense_reference(content: LoraModule, style: LoraModule | None, w_c: float, w_s: float, mu: float):
    """ΔW in float64 the slow way: dense ΔW, and the projector onto row(A_s) as pinv(A_s) A_s (no QR)."""
    d_c = content.delta_weight().double().flatten(1)  # (out, in·kh·kw)
    if style is None:
        return w_c * d_c
    a_s = style.down.double().flatten(1)
    projector = torch.linalg.pinv(a_s) @ a_s  # (in, in), = V_k V_kᵀ for full-rank A_s
    eye = torch.eye(projector.shape[0], dtype=torch.float64)
    return w_s * style.delta_weight().double().flatten(1) + w_c * d_c @ (eye - mu / (1 + mu) * projector)


def test_matches_dense_reference(base) -> None:
    # style covers every other module only: shared modules are projected, the rest pass through unchanged
    content = make_lora(base, 0)
    style = make_lora(base, 1, keep=lambda key: "attn1" in key or "resnets.0" in key)
    w_c, w_s, mu = 0.8, 1.2, 0.5
    before = weights(base)
    plan = plan_for(base, content, style, content_weight=w_c, style_weight=w_s, mu=mu)
    try:
        after = weights(base)
        n_conv = 0
        for key, module in content.modules.items():
            name = f"{key}.weight"
            got = (after[name].double() - before[name].double()).flatten(1)
            expected = dense_reference(module, style.modules.get(key), w_c, w_s, mu)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=key)
            n_conv += module.down.dim() == 4
        assert n_conv > 0  # the conv path (flattened input dim) was exercised
        assert plan.record["projected_modules"] > 0 and plan.record["content_only_modules"] > 0
    finally:
        plan.close()
    assert all(torch.equal(v, before[k]) for k, v in weights(base).items())


def test_mu_zero_is_direct_merge(base) -> None:
    content, style = make_lora(base, 2), make_lora(base, 3)
    reference = render(base)
    fuse_into(base, merge_loras([content, style], [0.7, 1.1]))
    try:
        direct = render(base)
    finally:
        unfuse(base)
    assert (direct - reference).abs().max() > 1e-3  # the LoRAs change the images
    plan = plan_for(base, content, style, content_weight=0.7, style_weight=1.1, mu=0.0)
    try:
        assert torch.equal(render(base), direct)
    finally:
        plan.close()
    assert torch.equal(render(base), reference)


def test_projection_keeps_the_stated_proportion(sdxl) -> None:
    # per layer: the content update inside span(V_k) shrinks to 1/(1+μ); outside it is unchanged
    content, style = make_lora(sdxl, 4), make_lora(sdxl, 5)
    from lorafuse.fusion.nplora import nplora_parts, style_basis

    for mu in (0.5, 3.0):
        (projected, _), _ = nplora_parts(content, style, mu)
        for key in list(content.modules)[::25]:
            basis = style_basis(style.modules[key])  # (in, k)
            before = content.modules[key].delta_weight().double().flatten(1)
            after = projected.modules[key].delta_weight().double().flatten(1)
            ratio = (after @ basis).norm() / (before @ basis).norm()
            assert ratio.item() == pytest.approx(1 / (1 + mu), rel=1e-5), key
            rest = torch.eye(basis.shape[0], dtype=torch.float64) - basis @ basis.T
            torch.testing.assert_close(after @ rest, before @ rest, rtol=1e-5, atol=1e-7)
            assert projected.modules[key].rank == content.modules[key].rank  # still low rank


def test_zero_weights_give_the_base_and_close_restores(base) -> None:
    content, style = make_lora(base, 6), make_lora(base, 7)
    reference = render(base)
    plan = plan_for(base, content, style, content_weight=0.0, style_weight=0.0)
    try:
        assert torch.equal(render(base), reference)
    finally:
        plan.close()
    plan = plan_for(base, content, style)
    try:
        assert (render(base) - reference).abs().max() > 1e-3
    finally:
        plan.close()
        plan.close()  # safe twice
    assert torch.equal(render(base), reference)


def test_saved_lora_is_low_rank(sd15, tmp_path) -> None:
    from safetensors import safe_open

    from lorafuse.fusion.nplora import NPLoraConfig, nplora_lora
    from lorafuse.lora.io import save_lora

    content, style = make_lora(sd15, 8), make_lora(sd15, 9)
    merged = nplora_lora(content, style, NPLoraConfig(mu=1.0))
    for key, module in merged.modules.items():
        assert module.rank == content.modules[key].rank + style.modules[key].rank
    path = save_lora(merged, tmp_path / "np.safetensors", arch="sd15", base=sd15)
    with safe_open(str(path), framework="pt") as f:
        assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in f.keys())


@pytest.mark.parametrize("mu", [-0.1, float("nan"), 1e5])
def test_mu_out_of_range_names_method_and_option(mu) -> None:
    # a non-finite value is refused by the config reader's finite check, which names the option the same way
    with pytest.raises(UserInputError, match=r"nplora: (option mu|.*mu: must be a finite number)"):
        make_config("nplora", mu=mu)
