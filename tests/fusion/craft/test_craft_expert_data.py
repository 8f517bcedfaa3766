"""λ-grid search -> best-λ expert examples, on a fake scorer whose optimum per prompt is known; world spans."""

from __future__ import annotations

import numpy as np
import pytest

from lorafuse.errors import UserInputError
from lorafuse.fusion.craft.expert_data import SpanPrompt, grid_search, lambda_grid, merge_searches
from lorafuse.fusion.craft.expert_world import EXTENSION_TYPES, span_prompts, world_spans
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


def test_world_spans_use_world_words_and_new_ones_are_unseen() -> None:
    words = set(vocabulary())
    for individual, style in (("teapot_08", "crayon"), ("mug_09", "mosaic")):
        spans = world_spans(individual, style)
        for part in ("content", "style"):
            assert not set(spans[part]["train"]) & set(spans[part]["new"])
            for text in spans[part]["train"] + spans[part]["new"]:
                assert set(text.split()) <= words, text  # the tokenizer has a token per world word
        for kind, (c, s) in EXTENSION_TYPES.items():
            got = span_prompts(individual, style, 3, c, s)
            assert len(got) == len(spans["content"][c]) * len(spans["style"][s]), kind
    with pytest.raises(UserInputError, match="'train' or 'new'"):
        span_prompts("teapot_08", "crayon", 1, "old", "train")
