"""CRAFT prompt markers: spans, the clean prompt, errors for malformed markers, default and overridden λ."""

from __future__ import annotations

import warnings

import pytest

from lorafuse.errors import UserInputError
from lorafuse.fusion.craft.prompts import CraftWeightWarning, aggregation_weights
from lorafuse.fusion.markers import common_markers, parse_prompt, strip_markers

# prompt -> (content span, style span, clean prompt, context)
PARSES = [
    (
        "a photo of a sks toy <c> smiling in a watercolor style <s>",
        "a photo of a sks toy", "smiling in a watercolor style",
        "a photo of a sks toy smiling in a watercolor style", "",
    ),
    (
        "A photo of a person <c> smiling in a watercolor style <s>",
        "A photo of a person", "smiling in a watercolor style",
        "A photo of a person smiling in a watercolor style", "",
    ),
    # punctuation left at a span's edge goes; no space before punctuation in the clean prompt
    ("a sks dog <c>, watercolor style <s>.", "a sks dog", "watercolor style", "a sks dog, watercolor style.", ""),
    # only one marker: the other span is absent
    ("a sks dog <c> on a beach", "a sks dog", None, "a sks dog on a beach", "on a beach"),
    ("a dog in watercolor style <s>", None, "a dog in watercolor style", "a dog in watercolor style", ""),
    # style before content: each marker tags the text since the previous marker
    ("watercolor style <s> a sks dog <c> at dusk", "a sks dog", "watercolor style",
     "watercolor style a sks dog at dusk", "at dusk"),
    # markers without spaces around them, runs of whitespace
    ("a  sks\tdog<c>in   watercolor<s>", "a sks dog", "in watercolor", "a sks dog in watercolor", ""),
    # no markers at all
    ("a photo of a dog", None, None, "a photo of a dog", "a photo of a dog"),
    # longer angle-bracket words are prompt text (textual-inversion placeholders)
    ("a <cat-toy> <c> in sketch style <s>", "a <cat-toy>", "in sketch style", "a <cat-toy> in sketch style", ""),
]  # fmt: skip


@pytest.mark.parametrize(("prompt", "content", "style", "clean", "context"), PARSES)
def test_parse(prompt, content, style, clean, context) -> None:
    p = parse_prompt(prompt)
    assert (p.content_span, p.style_span, p.clean, p.context) == (content, style, clean, context)
    assert "<c>" not in p.clean and "<s>" not in p.clean
    assert strip_markers(prompt) == clean


ERRORS = [
    ("a dog <c> more <c> style <s>", "given twice"),
    ("a dog <c> style <s> again <s>", "given twice"),
    ("<c> a dog in watercolor <s>", "tags no text"),
    ("a dog <c><s>", "tags no text"),
    ("a dog <c> , <s>", "tags no text"),
    ("a dog <x> in watercolor <s>", "unknown marker '<x>'"),
    ("a dog <C> in watercolor <S>", "lowercase"),
    ("a dog </c> in watercolor", "not open/close pairs"),
    ("a dog <lora:wc:0.8> <c>", "A1111 LoRA syntax"),
    ("<c>", "tags no text"),
]


@pytest.mark.parametrize(("prompt", "match"), ERRORS)
def test_malformed_markers_are_errors_naming_the_prompt(prompt, match) -> None:
    with pytest.raises(UserInputError, match=match) as info:
        parse_prompt(prompt)
    assert repr(prompt) in str(info.value) and "at character" in str(info.value)


# (prompt, lambda_c override, lambda_s override) -> (λ_c, λ_s)
LAMBDAS = [
    ("a dog <c> watercolor <s>", None, None, (1.0, 1.0)),
    ("a dog <c> on a beach", None, None, (1.0, 0.0)),
    ("a dog in watercolor <s>", None, None, (0.0, 1.0)),
    ("a dog", None, None, (0.0, 0.0)),
    ("a dog <c> watercolor <s>", 0.3, None, (0.3, 1.0)),
    ("a dog <c> watercolor <s>", None, 0.0, (1.0, 0.0)),
    ("a dog <c> on a beach", None, 0.5, (1.0, 0.5)),  # an explicit override wins over a missing marker
    (None, None, None, (1.0, 1.0)),  # no prompt known: both LoRAs
]


@pytest.mark.parametrize(("prompt", "lc", "ls", "expected"), LAMBDAS)
def test_aggregation_weights(prompt, lc, ls, expected) -> None:
    parsed = None if prompt is None else parse_prompt(prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in-range values never warn
        assert aggregation_weights(parsed, lc, ls) == expected


@pytest.mark.parametrize("value", [1.5, -0.2])
def test_weights_outside_unit_interval_warn(value) -> None:
    with pytest.warns(CraftWeightWarning, match="outside"):
        assert aggregation_weights(parse_prompt("a dog <c> x <s>"), value, None)[0] == value


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.5", True])
def test_non_numbers_are_errors(value) -> None:
    with pytest.raises(UserInputError, match="lambda_c"):
        aggregation_weights(None, value, None)


def test_a_batch_must_mark_the_same_spans() -> None:
    assert common_markers(["a dog <c> oil <s>", "a cat <c> sketch <s>"]).content_span == "a dog"
    with pytest.raises(UserInputError, match="separate runs"):
        common_markers(["a dog <c> oil <s>", "a cat <c>"])
    assert strip_markers(["a dog <c> oil <s>", "a cat <c>"]) == ["a dog oil", "a cat"]
