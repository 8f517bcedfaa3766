"""Which rows `compare_pair` runs and which LoRAs each gets, decided by what the methods declare (no method names
in eval/): the base, the single LoRAs of every input set a row uses (CRAFT's through CRAFT itself), then the rows;
which files an input set means; references only for a method that learns from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafuse.errors import UserInputError
from lorafuse.eval.world_compare import (
    CONTENT,
    CRAFT_CONTENT,
    CRAFT_STYLE,
    INPUT_RECIPES,
    PairLoras,
    _with_baselines,
    default_runs,
    input_sets_of,
    method_options,
    paper_runs,
    single_labels,
)


def pair(**own) -> PairLoras:
    p = Path("/nowhere")
    return PairLoras("teapot_08", "crayon", p / "c", p / "s", p / "cd", p / "sd", own=own)


def test_default_runs_keep_the_demo_rows() -> None:
    runs = _with_baselines(default_runs(["direct", "klora", "craft"]))
    assert [r[0] for r in runs] == ["base", "content only", "style only", CRAFT_CONTENT, CRAFT_STYLE,
                                    "direct", "klora", "craft"]  # fmt: skip
    assert runs[3][2] == "craft" and runs[1][2] == "direct"  # CRAFT's singles keep its routing and guidance
    assert runs[3][4] == {"style_weight": 0.0} and runs[4][4] == {"content_weight": 0.0}
    assert [r[3] for r in runs[-3:]] == ["locon", "locon", "craft"]
    assert input_sets_of(default_runs(["direct", "craft", "ziplora"])) == ["locon", "craft"]


def test_paper_runs_follow_the_declarations() -> None:
    runs = {r[0]: r for r in paper_runs(["direct", "klora", "blora", "switch", "craft"])}
    assert set(runs) == {"direct [locon]", "klora [attn]", "blora [blora]", "switch official [locon]", "craft [craft]"}
    assert runs["klora [attn]"][4] == {"non_attention": "ignore"}
    assert runs["switch official [locon]"][4] == {"official": True}


def test_every_input_set_gets_its_singles() -> None:
    runs = _with_baselines([("klora [attn]", "fused", "klora", "attn", {}), ("x", "fused", "direct", "blora", {})])
    labels = [r[0] for r in runs]
    assert labels[:5] == ["base", "attn content only", "attn style only", "blora content only", "blora style only"]
    assert all(r[2] == "direct" for r in runs[:5])
    assert single_labels("locon")[0] == CONTENT and single_labels("craft")[0] == CRAFT_CONTENT
    assert set(INPUT_RECIPES) == {"locon", "attn", "blora", "craft"}
    assert INPUT_RECIPES["blora"]["layers"] == "blora" and INPUT_RECIPES["attn"]["conv_rank"] == 0


def test_files_of_an_input_set() -> None:
    loras = pair(attn=(Path("a"), Path("b")))
    assert loras.files("attn") == (Path("a"), Path("b")) and loras.files("locon") == (loras.content, loras.style_lora)
    with pytest.raises(UserInputError, match="no LoRAs trained for input set 'craft'"):
        loras.files("craft")


def test_only_methods_that_learn_from_references_get_them() -> None:
    assert method_options("klora", pair()) == {}
