"""The leaderboard's pair list and README table (the run itself is a benchmark, smoke-run by hand)."""

import pytest
from benchmarks.fusion_leaderboard import (
    ablation_figures,
    held_out_pairs,
    leaderboard_runs,
    markdown_table,
    paired_figures,
)

from lorafuse.errors import UserInputError
from lorafuse.world.catalog import (
    CLASS_NAMES,
    HELD_OUT_STYLES,
    INDIVIDUALS_PER_CLASS,
    SEEN_INDIVIDUALS,
    parse_individual,
)


def test_pairs_are_held_out_distinct_and_cover_every_style() -> None:
    pairs = held_out_pairs(10)
    assert len(set(pairs)) == 10 and len({ind for ind, _ in pairs}) == 10  # ten different individuals
    assert all(parse_individual(ind).held_out for ind, _ in pairs)
    assert {s for _, s in pairs} == set(HELD_OUT_STYLES)
    total = len(CLASS_NAMES) * (INDIVIDUALS_PER_CLASS - SEEN_INDIVIDUALS) * len(HELD_OUT_STYLES)
    everything = held_out_pairs(total)
    assert len(set(everything)) == total  # every held-out individual x style combination, each once
    assert held_out_pairs(2) == pairs[:2]  # a smoke run is the start of the full run
    with pytest.raises(UserInputError, match=rf"--pairs must be in 1\.\.{total}"):
        held_out_pairs(total + 1)


def test_markdown_table_shows_inputs_intervals_and_paired_differences() -> None:
    rows = [{"pair": f"p{p}", "seed": 0, "kind": "fused", "method": m, "inputs": "attn",
             "oracle_content": v + p / 10, "oracle_style": 0.3, "oracle_hmean": 0.4 + (m == "klora [attn]") * 0.1}
            for p in range(3) for m, v in (("direct [attn]", 0.5), ("klora [attn]", 0.4))]  # fmt: skip
    figures = {"direct [attn]": {"oracle_content": {"mean": 0.5, "low": 0.4, "high": 0.6, "n": 8},
                                 "seconds_per_image": {"mean": 1.25, "low": 1.0, "high": 1.5, "n": 8}},
               "klora [attn]": {"oracle_content": {"mean": 0.25, "low": 0.25, "high": 0.25, "n": 1}}}  # fmt: skip
    paired = paired_figures(rows)
    assert {(d.method, d.metric) for d in paired} == {
        ("klora [attn]", m) for m in ("oracle_content", "oracle_style", "oracle_hmean")}
    text = markdown_table(figures, paired, rows, "python -m benchmarks.fusion_leaderboard --pairs 20 --seeds 4")
    lines = text.splitlines()
    assert lines[0].startswith("| row | inputs | oracle_content |") and lines[0].endswith("| s / image |")
    assert lines[2].startswith("| direct [attn] | attn | 0.500 [0.400, 0.600] |") and lines[2].endswith("| 1.25 |")
    assert lines[3].startswith("| klora [attn] | attn | 0.250 |")
    assert "| -0.100 [-0.100, -0.100] | +0.000 [+0.000, +0.000] | +0.100 [+0.100, +0.100] |" in lines[3]
    assert lines[1].count("---") == lines[0].count("|") - 1
    assert text.endswith("`python -m benchmarks.fusion_leaderboard --pairs 20 --seeds 4`")


def test_every_row_names_its_inputs_and_has_its_direct_baseline() -> None:
    runs = leaderboard_runs(["direct", "klora", "blora", "craft", "ziplora"])
    labels = [r[0] for r in runs]
    assert all(r[0].endswith(f"[{r[3]}]") and r[1] == "fused" for r in runs)
    assert {"klora [locon]", "klora [attn]", "blora [locon]", "blora [blora]", "craft [craft]",
            "craft smooth [craft]", "ziplora [attn]"} <= set(labels)  # fmt: skip
    assert "craft [locon]" not in labels and "nplora [attn]" not in labels  # only the chosen methods
    for inputs in {r[3] for r in runs}:
        assert f"direct [{inputs}]" in labels  # every row's paired baseline is there
    klora = next(r for r in runs if r[0] == "klora [attn]")
    assert klora[4] == {"non_attention": "ignore"}  # the official code touches nothing outside attention
    assert "direct [attn]" in [r[0] for r in leaderboard_runs(["klora"])]


def test_ablations_are_compared_with_their_full_method() -> None:
    # full − ablation per pair: craft beats "craft smooth" by 0.1 on content in every pair; "craft constant" is absent
    rows = [{"pair": f"p{p}", "seed": s, "kind": "fused", "method": m, "inputs": "craft",
             "oracle_content": 0.5 + p / 10 - (m == "craft smooth [craft]") * 0.1, "oracle_style": 0.3,
             "oracle_hmean": 0.4}
            for p in range(3) for s in range(2) for m in ("craft [craft]", "craft smooth [craft]")]  # fmt: skip
    diffs = ablation_figures(rows, ["direct", "craft"])
    assert {(d.method, d.baseline, d.interval) for d in diffs} == {
        ("craft [craft]", "craft smooth [craft]", i) for i in ("t", "bootstrap")}
    content = next(d for d in diffs if d.metric == "oracle_content" and d.interval == "t")
    assert content.mean == pytest.approx(0.1) and content.n == 3 and content.verdict == "better"


def test_a_done_pair_is_reused_and_done_only_never_trains(tmp_path, monkeypatch) -> None:
    import argparse

    import benchmarks.fusion_leaderboard as lb

    from lorafuse.eval.world_compare import CompareResult

    calls = []

    def fake_train(individual, style, work, **kw):
        calls.append(("train", individual, style, tuple(kw["input_sets"])))
        return object()

    def fake_compare(pipe, loras, **kw):
        calls.append(("compare", kw["seeds"]))
        return CompareResult("teapot_08+crayon", "a prompt", [0, 1], rows=[{"method": "direct [locon]", "seed": 0}])

    monkeypatch.setattr(lb, "train_pair_loras", fake_train)
    monkeypatch.setattr(lb, "compare_pair", fake_compare)
    monkeypatch.setattr(lb, "side_by_side", lambda result, title: None)
    monkeypatch.setattr("lorafuse.utils.images.save_image", lambda image, path: None)
    args = argparse.Namespace(content_epochs=None, style_epochs=None, seeds=2, seed=0, steps=3, guidance=4.0,
                              no_progress=True)  # fmt: skip
    methods = ["direct", "klora"]
    assert lb.run_pair(None, None, "teapot_08", "crayon", args, methods, tmp_path, done_only=True) is None
    assert calls == []  # nothing done yet, and --done-only neither trains nor samples
    first = lb.run_pair(None, None, "teapot_08", "crayon", args, methods, tmp_path)
    assert [c[0] for c in calls] == ["train", "compare"] and calls[0][3] == ("locon", "attn")
    assert first["rows"] == [{"method": "direct [locon]", "seed": 0}] and set(first["cpu_seconds"]) == {"train", "compare"}
    # a rerun (killed run resumed, or --done-only) reads the pair back without training or sampling again
    assert lb.run_pair(None, None, "teapot_08", "crayon", args, methods, tmp_path) == first
    assert lb.run_pair(None, None, "teapot_08", "crayon", args, methods, tmp_path, done_only=True) == first
    assert len(calls) == 2
    args.seeds = 4  # other settings: the cached pair does not count
    assert lb.run_pair(None, None, "teapot_08", "crayon", args, methods, tmp_path, done_only=True) is None
