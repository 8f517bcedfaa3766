"""λ-grid search -> best-λ / soft-label expert examples, on a fake scorer whose optimum per prompt is known; world
spans, prompts and the per-prompt oracle judge."""

from __future__ import annotations

import numpy as np
import pytest

from lorafuse.errors import UserInputError
from lorafuse.eval.expert_world import (
    EXTENSION_TYPES,
    NEW_OTHER_STYLES,
    TRAIN_OTHER_STYLES,
    WorldJudge,
    WorldPrompt,
    span_prompts,
    world_prompts,
    world_spans,
)
from lorafuse.fusion.craft.expert_data import SpanPrompt, grid_search, lambda_grid, merge_searches
from lorafuse.world.catalog import vocabulary

# each content word / style word has its own best λ: the scorer peaks there (a concave bowl per prompt)
BEST_C = {"dog": 0.25, "cat": 0.75}
BEST_S = {"ink": 1.0, "pixel": 0.5}


def fake_scorer(calls: list):
    def score(prompts, lc, ls):
        calls.append((lc, ls, len(prompts)))
        return np.array([
            -((lc - BEST_C[p.content_span.split()[-1]]) ** 2) - (ls - BEST_S[p.style_span.split()[0]]) ** 2
            for p in prompts
        ])  # fmt: skip

    return score


def prompts() -> list[SpanPrompt]:
    return [SpanPrompt(k + 1, f"a sks {c}", f"{s} style") for k, c in enumerate(BEST_C) for s in BEST_S]


def test_grid_is_the_product_and_validated() -> None:
    assert lambda_grid((0.0, 1.0)) == [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)]
    assert len(lambda_grid()) == 25
    assert lambda_grid((0.5,), (0.0, 2.0)) == [(0.5, 0.0), (0.5, 2.0)]
    for bad in ((), (-0.5, 1.0), (float("nan"),), (1.0, 1.0)):
        with pytest.raises(UserInputError, match="grid"):
            lambda_grid(bad)


def test_best_lambda_per_prompt_is_the_scorers_optimum() -> None:
    calls: list = []
    search = grid_search(prompts(), fake_scorer(calls))
    # one call per grid point, all prompts at once (an image scorer batches them into one sampling run)
    assert calls == [(lc, ls, 4) for lc, ls in lambda_grid()]
    assert search.scores.shape == (4, 25)
    examples = search.examples()
    got = {(e.content_span, e.style_span): (e.lambda_c, e.lambda_s) for e in examples}
    assert got == {
        ("a sks dog", "ink style"): (0.25, 1.0), ("a sks dog", "pixel style"): (0.25, 0.5),
        ("a sks cat", "ink style"): (0.75, 1.0), ("a sks cat", "pixel style"): (0.75, 0.5),
    }  # fmt: skip
    assert [e.concept_id for e in examples] == [1, 1, 2, 2]
    np.testing.assert_array_equal(search.score_of((0.25, 1.0))[:1], [0.0])
    assert merge_searches([search, search]) == examples + examples
    record = search.to_json()
    assert record["prompts"][0]["best"] == [0.25, 1.0] and len(record["prompts"][0]["scores"]) == 25


def test_ties_go_to_the_default_lambda() -> None:
    flat = grid_search(prompts()[:1], lambda p, lc, ls: np.zeros(len(p)))
    assert flat.best() == [(1.0, 1.0)]
    # within the tolerance counts as a tie, and (1, 1) wins it; outside, the true best wins
    bump = {(0.5, 0.5): 0.01}
    near = grid_search(prompts()[:1], lambda p, lc, ls: np.full(len(p), bump.get((lc, ls), 0.0)),
                       tie_tolerance=0.02)  # fmt: skip
    assert near.best() == [(1.0, 1.0)]
    far = grid_search(prompts()[:1], lambda p, lc, ls: np.full(len(p), bump.get((lc, ls), 0.0)))
    assert far.best() == [(0.5, 0.5)]


def test_bad_scores_and_inputs_are_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        grid_search(prompts(), lambda p, lc, ls: np.zeros(1))
    with pytest.raises(ValueError, match="non-finite.*λ=\\(0.0, 0.0\\)"):
        grid_search(prompts(), lambda p, lc, ls: np.full(len(p), np.nan))
    with pytest.raises(UserInputError, match="at least one prompt"):
        grid_search([], fake_scorer([]))
    with pytest.raises(UserInputError, match="not on the grid"):
        grid_search(prompts(), fake_scorer([])).score_of((0.3, 0.3))
    with pytest.raises(UserInputError, match="markers"):
        SpanPrompt(1, "a dog <c>", "ink style")
    assert SpanPrompt(1, "a dog", "in ink style").marked == "a dog <c> in ink style <s>"


def test_soft_labels_limits_and_a_hand_computed_case() -> None:
    calls: list = []
    search = grid_search(prompts(), fake_scorer(calls))
    points = np.array(search.grid)
    # τ -> 0: the argmax (each fake prompt has a unique optimum on the grid); τ -> ∞: the grid's centre
    np.testing.assert_allclose(search.soft_best(1e-6), np.array(search.best()))
    np.testing.assert_allclose(search.soft_best(1e6), np.tile(points.mean(0), (4, 1)), atol=1e-5)
    np.testing.assert_array_equal(search.soft_best(0.0), np.array(search.best()))
    # two points, scores 0 and τ·ln 3: weights 1/4 and 3/4
    tau = 0.05
    two = grid_search(prompts()[:1], lambda p, lc, ls: np.full(len(p), tau * np.log(3) * lc), [(0.0, 0.2), (1.0, 0.6)],
                      temperature=tau)  # fmt: skip
    np.testing.assert_allclose(two.soft_best(), [[0.75, 0.5]])
    (ex,) = two.examples()  # examples carry the soft label when the search has a temperature
    assert (ex.lambda_c, ex.lambda_s) == pytest.approx((0.75, 0.5))
    assert two.to_json()["prompts"][0]["label"] == pytest.approx([0.75, 0.5])
    with pytest.raises(UserInputError, match="temperature"):
        search.soft_best(-1.0)
    with pytest.raises(UserInputError, match="temperature"):
        grid_search(prompts(), fake_scorer([]), temperature=float("inf"))


def test_soft_labels_are_steadier_under_noise_than_the_argmax() -> None:
    # a true optimum at λ = (0.5, 0.5) on a shallow bowl, plus noise as large as the bowl's depth: over noise
    # draws the argmax scatters over the grid, the soft label stays near the optimum
    grid = lambda_grid((0.0, 0.5, 1.0))
    rng = np.random.default_rng(0)
    hard, soft = [], []
    for _ in range(200):
        noise = {g: rng.normal(0, 0.05) for g in grid}
        search = grid_search(prompts()[:1], lambda p, lc, ls, noise=noise: np.full(
            len(p), -0.1 * ((lc - 0.5) ** 2 + (ls - 0.5) ** 2) + noise[(lc, ls)]), grid, temperature=0.05)  # fmt: skip
        hard.append(np.abs(np.array(search.best()[0]) - 0.5).mean())
        soft.append(np.abs(search.soft_best()[0] - 0.5).mean())
    assert np.mean(soft) < 0.5 * np.mean(hard)


def test_world_spans_use_world_words_and_new_ones_are_unseen() -> None:
    words = set(vocabulary())
    for individual, style in (("teapot_08", "crayon"), ("mug_09", "mosaic"), ("car_08", "blueprint")):
        spans = world_spans(individual, style)
        for part in ("content", "style"):
            train, new = ({x.text for x in spans[part][w]} for w in ("train", "new"))
            assert not train & new
            for span in spans[part]["train"] + spans[part]["new"]:
                assert set(span.text.split()) <= words, span  # the tokenizer has a token per world word
        # what each span asks for: the LoRA's own subject / style, or something else the base model knows
        assert {x.target for x in spans["content"]["train"] if x.kind == "subject"} == {individual}
        assert individual.split("_")[0] not in {
            x.target for x in spans["content"]["new"] if x.kind == "other"
        }
        assert {(x.kind, x.target) for x in spans["style"]["train"]} == {
            ("trigger", style), *(("other", o) for o in TRAIN_OTHER_STYLES)}  # fmt: skip
        assert {x.target for x in spans["style"]["new"] if x.kind == "other"} == set(NEW_OTHER_STYLES)
        assert all(
            "sks" in x.text for x in spans["style"]["train"] + spans["style"]["new"] if x.kind == "trigger"
        )
        assert {x.kind for x in spans["style"]["new"]} == {"trigger", "name", "other"}  # "name" only when new
        for kind, (c, s) in EXTENSION_TYPES.items():
            got = span_prompts(individual, style, 3, c, s)
            assert len(got) == len(spans["content"][c]) * len(spans["style"][s]), kind
    assert not set(TRAIN_OTHER_STYLES) & set(NEW_OTHER_STYLES)
    with pytest.raises(UserInputError, match="'train' or 'new'"):
        span_prompts("teapot_08", "crayon", 1, "old", "train")


def test_world_prompts_cover_every_style_wording_and_carry_targets() -> None:
    spans = world_spans("teapot_08", "crayon")
    got = world_prompts("teapot_08", "crayon", 2, "train", "train", per_style=2, offset=1)
    assert [p.style_span for p in got] == [s.text for s in spans["style"]["train"] for _ in range(2)]
    contents = [c.text for c in spans["content"]["train"]]
    assert [p.content_span for p in got[:3]] == contents[1:4]  # content wordings in turn from the offset
    first = got[0]
    assert (first.concept_id, first.style_kind, first.style_target) == (2, "trigger", "crayon")
    assert first.content_target == (
        "teapot_08" if first.content_kind == "subject" else first.content_span.split()[-1]
    )
    full = world_prompts("teapot_08", "crayon", 2, "new", "train")
    sub = world_prompts("teapot_08", "crayon", 2, "new", "train", limit=5)
    assert len(sub) == 5 and all(p in full for p in sub)
    assert sub == world_prompts("teapot_08", "crayon", 2, "new", "train", limit=5)  # seeded
    with pytest.raises(UserInputError, match="per_style"):
        world_prompts("teapot_08", "crayon", 1, "train", "train", per_style=0)


def test_world_judge_scores_each_prompt_against_its_own_targets() -> None:
    from lorafuse.eval.metrics import OracleScorer, world_references
    from lorafuse.world.oracle import default_oracle

    oracle = default_oracle()
    a = WorldPrompt(1, "a sks teapot", "in sks style", "subject", "trigger", "teapot_08", "crayon")
    b = WorldPrompt(1, "a car", "in neon glow style", "other", "other", "car", "neon")
    # prompt-major images, 2 seeds each: a's are crayon renders, b's neon renders
    images = np.concatenate(
        [world_references(style="crayon", count=2), world_references(style="neon", count=2)]
    )
    out = WorldJudge(oracle)(images, [a, b], seeds=2)
    assert out["style"].shape == (2, 2)
    ref = OracleScorer(oracle, individual="teapot_08", style="crayon")(images[:2])
    # the oracle runs in float32 on a batch of another size: equal to float32 rounding
    np.testing.assert_allclose(out["content"][0], ref["oracle_content"], atol=1e-5)
    np.testing.assert_allclose(out["style"][0], ref["oracle_style"], atol=1e-5)
    assert out["style"].min() > 0.5  # each prompt's renders match the style it asks for
    swapped = WorldJudge(oracle)(images, [b, a], seeds=2)["style"]
    assert swapped.max() < out["style"].min()
