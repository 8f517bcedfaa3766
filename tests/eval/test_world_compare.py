"""Which LoRAs each method of the comparison gets, decided by what the method declares (no method names)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafuse.errors import UserInputError
from lorafuse.eval.world_compare import (
    CRAFT_CONTENT,
    CRAFT_STYLE,
    PairLoras,
    _layer_sets,
    _runs,
    method_options,
)


def pair(**own) -> PairLoras:
    p = Path("/nowhere")
    return PairLoras("teapot_08", "crayon", p / "c", p / "s", p / "cd", p / "sd", own=own)


def test_methods_on_their_own_layers_get_their_own_loras_and_single_rows() -> None:
    loras = pair(craft=(Path("cc"), Path("cs")))
    runs = {label: (kind, method, c, s, opts) for label, kind, method, c, s, opts in _runs(loras, ["klora", "craft"])}
    assert runs["klora"][2:4] == (loras.content, loras.style_lora)
    assert runs["craft"][2:4] == (Path("cc"), Path("cs"))
    assert runs[CRAFT_CONTENT] == ("content", "craft", Path("cc"), Path("cs"), {"style_weight": 0.0})
    assert runs[CRAFT_STYLE][4] == {"content_weight": 0.0}
    assert _layer_sets(["direct", "craft", "ziplora"]) == ["craft"]


def test_missing_layer_set_is_named() -> None:
    with pytest.raises(UserInputError, match="layer set 'craft'"):
        _runs(pair(), ["craft"])


def test_only_methods_that_learn_from_references_get_them() -> None:
    assert method_options("klora", pair()) == {}
