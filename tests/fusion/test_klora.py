"""K-LoRA against slow references: the table computed once equals a per-step, per-layer recomputation written
out here; sampling with it equals `NaiveKLoraHook`, which recomputes ΔW, Top-K, γ and S at every step (or call).
Tiny SD1.5, SDXL and random-weight world pipelines; LoRAs with random non-zero up and down on attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from benchmarks.klora_reference import NaiveKLoraHook
from PIL import Image

from lorafuse.errors import UserInputError
from lorafuse.fusion.klora_schedule import (
    LayerScores,
    gamma_official,
    official_scale,
    schedule_heatmap,
    schedule_table,
)
from lorafuse.fusion.registry import get_method, make_config
from lorafuse.fusion.sampling import sample
from lorafuse.fusion.synthetic import random_lora
from lorafuse.lora.targets import base_modules

PROMPT = "a photo of sks dog"


@pytest.fixture(params=["sd15", "sdxl", "world"])
def arch_pipe(request):
    return request.getfixturevalue(request.param)


def pair(pipe, alpha=None):
    # Mixed ranks so K_l = r_c r_s differs between layers; style smaller so γ is not ~1.
    content = random_lora(pipe, seed=1, rank=(2, 4), scale=0.3, alpha=alpha)
    style = random_lora(pipe, seed=2, rank=(4, 8, 2), scale=0.2, alpha=alpha)
    return content, style


def run(pipe, hooks=(), steps=6, guidance=None):
    from lorafuse.guidance import ClassifierFreeGuidance

    return sample(pipe, PROMPT, steps=steps, seed=3, progress=False, hooks=hooks,
                  guidance=guidance or ClassifierFreeGuidance(7.5)).images  # fmt: skip


def plan_klora(pipe, content, style, **options):
    return get_method("klora")().plan(pipe, content, style, make_config("klora", **options))


def naive_table(pipe, content, style, num_steps, alpha=1.5, beta=0.5):
    """The paper rule written out: loops over layers and steps, ΔW from the factors, a full sort for Top-K."""
    refs = base_modules(pipe).modules
    layers = [k for k in refs if k in content.modules or k in style.modules]

    def delta(state, key):
        m = state.modules.get(key)
        return None if m is None else m.scale * (m.up @ m.down)

    abs_c = sum(delta(content, k).abs().sum().item() for k in layers if k in content.modules)
    abs_s = sum(delta(style, k).abs().sum().item() for k in layers if k in style.modules)
    gamma = abs_c / abs_s
    table = {}
    for key in layers:
        dc, ds = delta(content, key), delta(style, key)
        k = content.modules[key].rank * style.modules[key].rank
        top_c = dc.abs().flatten().sort(descending=True).values[:k].sum().item()
        top_s = ds.abs().flatten().sort(descending=True).values[:k].sum().item()
        for i in range(num_steps):
            scale = alpha * i / num_steps + beta
            table[key, i] = top_c >= gamma * scale * top_s
    return table


def test_schedule_equals_per_step_per_layer_recomputation(arch_pipe) -> None:
    content, style = pair(arch_pipe)
    plan = plan_klora(arch_pipe, content, style)
    try:
        hook = plan.hooks[0]
        table = hook.table(10)
        expected = naive_table(arch_pipe, content, style, 10)
        # the test cannot pass by accident: both LoRAs are chosen, and layers switch during the run
        assert table.any() and not table.all()
        assert (table[:, 0] != table[:, -1]).any()
        for row, name in enumerate(plan.record["layers"]):
            for i in range(10):
                assert bool(table[row, i]) == expected[name, i], (name, i)
        # paper rule: S(i) rises, so a layer goes content -> style at most once
        assert not (table[:, 1:] & ~table[:, :-1]).any()
    finally:
        plan.close()


@pytest.mark.parametrize("mechanism", ["swap", "adapter", "inplace"])
def test_sampling_equals_naive_per_step_hook(arch_pipe, mechanism) -> None:
    content, style = pair(arch_pipe)
    base = run(arch_pipe)
    plan = plan_klora(arch_pipe, content, style, content_weight=0.8, style_weight=1.2, mechanism=mechanism)
    try:
        fast = run(arch_pipe, plan.hooks)
        schedule = torch.tensor(plan.record["schedule"]["content"], dtype=torch.bool)
    finally:
        plan.close()
    naive = NaiveKLoraHook(arch_pipe, content, style, content_weight=0.8, style_weight=1.2)
    slow = run(arch_pipe, [naive])
    assert np.abs(fast - base).max() > 0.05, "K-LoRA must change the image"
    # the naive hook made the same choices at every step and layer (its layers are in named_modules order)
    by_name = dict(zip(plan.record["layers"], schedule.tolist(), strict=True))
    for i, row in enumerate(naive.choices):
        for path, role in zip(naive.paths, row, strict=True):
            assert by_name["unet." + path][i] == (role == "c")
    # swap: the same fused tensors, bit for bit; adapter: unmerged W x + B(A x), float32 rounding only
    np.testing.assert_allclose(fast, slow, rtol=0, atol=0 if mechanism in ("swap", "inplace") else 2e-4)
    np.testing.assert_array_equal(run(arch_pipe), base)  # plan.close() and after_sampling restored the base


def test_official_mode_equals_naive_per_call_hook(sd15) -> None:
    content, style = pair(sd15, alpha=1.0)  # alpha != rank: the official code ignores alpha / r
    steps = (5, 5, 3, 5)  # the counter is never reset: it lines up only while every image has the same steps
    plan = plan_klora(sd15, content, style, klora_mode="official")
    try:
        fast = [run(sd15, plan.hooks, steps=n) for n in steps]
        record = plan.record
    finally:
        plan.close()
    naive = NaiveKLoraHook(sd15, content, style, mode="official")
    slow = [run(sd15, [naive], steps=n) for n in steps]
    n_layers = len(record["layers"])
    # one batched CFG forward per step, one call per projection
    assert record["official_calls"] == naive.count == sum(steps) * n_layers
    assert record["official_period"] == 5 * n_layers
    assert record["beta"] == pytest.approx(0.85 * 1.5)
    table = torch.tensor(record["schedule"]["content"], dtype=torch.bool)
    assert table.any() and not table.all()
    np.testing.assert_array_equal(fast[0], fast[1])
    assert np.abs(fast[0] - fast[3]).max() > 1e-3  # out of phase after the 3-step image
    for ours, reference in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(ours, reference)
    # scores without alpha / r: up @ down
    m = content.modules[record["layers"][0]]
    expected = (m.up @ m.down).abs().flatten().topk(record["k"][0]).values.sum().item()
    assert record["top_c"][0] == pytest.approx(expected, rel=1e-6)


def test_official_gamma_and_scale() -> None:
    ratios = [1.0, 1.0, 1.0, 10.0]  # mean 3.25; 10 >= 3 x 3.25 is dropped, as in the official utils.py
    scores = LayerScores(
        ["a", "b", "c", "d"], [1] * 4, [1.0] * 4, [1.0] * 4, ratios, [1.0] * 4, [True] * 4, [True] * 4
    )
    assert gamma_official(scores) == pytest.approx(1.0)
    # "s*": starts at 0.85 α, reaches α at u = 0.15, wraps to 0, climbs back
    assert official_scale(0, 100, 1.5, 1.275) == pytest.approx(1.275)
    assert official_scale(10, 100, 1.5, 1.275) == pytest.approx(1.425)
    assert official_scale(20, 100, 1.5, 1.275) == pytest.approx(0.075)
    assert official_scale(99, 100, 1.5, 1.275) == pytest.approx((1.5 * 0.99 + 1.275) % 1.5)


def test_ablation_tables(sd15) -> None:
    content, style = pair(sd15)
    fixed = plan_klora(sd15, content, style, selection="fixed")
    try:
        table, gamma = fixed.hooks[0].table(12), fixed.record["gamma"]
        expected = torch.tensor([gamma * (1.5 * i / 12 + 0.5) >= 1 for i in range(12)])
        assert (table == expected[None, :]).all()  # one choice per step, the same for every layer
    finally:
        fixed.close()
    rnd = plan_klora(sd15, content, style, selection="random", random_seed=7)
    try:
        table = rnd.hooks[0].table(40)
        g = torch.Generator().manual_seed(7)
        assert torch.equal(table, torch.rand(table.shape, generator=g, dtype=torch.float64) < 1 / 3)
        assert 0.25 < table.float().mean() < 0.42
    finally:
        rnd.close()


def test_fixed_k_and_all_elements(sd15) -> None:
    content, style = pair(sd15)
    plan = plan_klora(sd15, content, style, k=10**9)  # K = every element: S = Σ|ΔW| per layer
    try:
        name = plan.record["layers"][0]
        m = content.modules[name]
        assert plan.record["top_c"][0] == pytest.approx(
            (m.scale * m.up @ m.down).abs().sum().item(), rel=1e-6
        )
    finally:
        plan.close()


def test_non_attention_modules(sd15) -> None:
    everything = random_lora(sd15, seed=5, rank=2, scale=0.2, keep=lambda ref: ref.component == "unet")
    attention_only = random_lora(sd15, seed=1, rank=2, scale=0.3)
    plans = {mode: plan_klora(sd15, everything, attention_only, non_attention=mode) for mode in ("ignore",)}
    try:
        ignored = run(sd15, plans["ignore"].hooks, steps=3)
        assert plans["ignore"].record["non_attention"] == "ignore"
    finally:
        plans["ignore"].close()
    summed = plan_klora(sd15, everything, attention_only)  # auto = sum for the paper rule
    try:
        assert summed.record["non_attention"] == "sum"
        n_other = sum(1 for k in everything.modules if k not in attention_only.modules)
        assert summed.record["fused_modules"] == n_other > 0
        assert np.abs(run(sd15, summed.hooks, steps=3) - ignored).max() > 1e-3
    finally:
        summed.close()


def test_heatmap_png(sd15, tmp_path) -> None:
    content, style = pair(sd15)
    plan = plan_klora(sd15, content, style)
    try:
        path = schedule_heatmap(plan.hooks[0].table(25), tmp_path / "s.png", layers=plan.record["layers"])
    finally:
        plan.close()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= 400


def test_schedule_table_rejects_unknown_selection() -> None:
    scores = LayerScores(["a"], [1], [1.0], [1.0], [1.0], [1.0], [True], [True])
    with pytest.raises(ValueError, match="selection"):
        schedule_table(scores, 3, gamma=1.0, selection="bogus")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"alpha": -1.0}, "alpha"),
        ({"random_p": 1.5}, "random_p"),
        ({"k": -2}, "k="),
        ({"klora_mode": "official", "selection": "random"}, "selection"),
        ({"mechanism": "gpu"}, "mechanism"),
        ({"content_weight": 9.0}, "content_weight"),
    ],
)
def test_bad_options(options, match) -> None:
    with pytest.raises(UserInputError, match=f"klora.*{match}"):
        make_config("klora", **options)


def test_lora_without_attention_is_an_error(sd15) -> None:
    content = random_lora(sd15, seed=1)
    convs = random_lora(sd15, seed=2, keep=lambda ref: ref.component == "unet" and ref.path.endswith("conv1"))
    convs.source_path = "convs.safetensors"
    with pytest.raises(UserInputError, match="convs.safetensors has no LoRA on attention"):
        plan_klora(sd15, content, convs)
