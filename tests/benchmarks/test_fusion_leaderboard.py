"""The leaderboard's pair list and README table (the run itself is a benchmark, smoke-run by hand)."""

import pytest
from benchmarks.fusion_leaderboard import held_out_pairs, markdown_table

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


def test_markdown_table_shows_intervals_only_for_several_values() -> None:
    figures = {"direct": {"oracle_content": {"mean": 0.5, "low": 0.4, "high": 0.6, "n": 8},
                          "seconds_per_image": {"mean": 1.25, "low": 1.0, "high": 1.5, "n": 8}},
               "klora": {"oracle_content": {"mean": 0.25, "low": 0.25, "high": 0.25, "n": 1}}}  # fmt: skip
    text = markdown_table(figures, "python -m benchmarks.fusion_leaderboard --pairs 10 --seeds 4")
    lines = text.splitlines()
    assert lines[0].startswith("| method | oracle_content |") and lines[0].endswith("| s / image |")
    assert lines[2].startswith("| direct | 0.500 [0.400, 0.600] |") and lines[2].endswith("| 1.25 |")
    assert lines[3].startswith("| klora | 0.250 |")
    assert lines[1].count("---") == lines[0].count("|") - 1
    assert text.endswith("`python -m benchmarks.fusion_leaderboard --pairs 10 --seeds 4`")
