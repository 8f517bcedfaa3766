"""Which rows `compare_pair` runs: the base, the single LoRAs of every input set a row uses (CRAFT's through CRAFT
itself), then the rows; and which files an input set means."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafuse.errors import UserInputError
from lorafuse.eval.world_compare import (
    CONTENT,
    CRAFT_CONTENT,
    INPUT_RECIPES,
    PairLoras,
    _with_baselines,
    default_runs,
    single_labels,
)


def test_default_runs_keep_the_demo_rows() -> None:
    runs = _with_baselines(default_runs(["direct", "klora", "craft"]))
    assert [r[0] for r in runs] == ["base", "content only", "style only", "craft content only", "craft style only",
                                    "direct", "klora", "craft"]  # fmt: skip
    assert runs[3][2] == "craft" and runs[1][2] == "direct"  # CRAFT's singles keep its routing and guidance
    assert [r[3] for r in runs[-3:]] == ["locon", "locon", "craft"]


def test_every_input_set_gets_its_singles() -> None:
    runs = _with_baselines([("klora [attn]", "fused", "klora", "attn", {}), ("x", "fused", "direct", "blora", {})])
    labels = [r[0] for r in runs]
    assert labels[:5] == ["base", "attn content only", "attn style only", "blora content only", "blora style only"]
    assert single_labels("locon")[0] == CONTENT and single_labels("craft")[0] == CRAFT_CONTENT
    assert set(INPUT_RECIPES) == {"locon", "attn", "blora", "craft"}
    assert INPUT_RECIPES["blora"]["layers"] == "blora" and INPUT_RECIPES["attn"]["conv_rank"] == 0


def test_files_of_an_input_set() -> None:
    p = Path("x.safetensors")
    loras = PairLoras("teapot_08", "crayon", p, p, p, p, sets={"attn": (Path("a"), Path("b"))})
    assert loras.files("attn") == (Path("a"), Path("b")) and loras.files("locon") == (p, p)
    with pytest.raises(UserInputError, match="no LoRAs trained for input set 'craft'"):
        loras.files("craft")
