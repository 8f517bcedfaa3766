"""Prompt markers: `<c>` and `<s>` tag the content and the style span of a prompt (CRAFT-LoRA, `docs/algorithms.md`).

Every method accepts a marked prompt and sends the clean prompt to the text encoder (`FusionMethod.prepare_prompt`);
CRAFT also reads the spans. One grammar, used by the methods and by CLIP-T scoring alike.

    "a photo of a sks toy <c> smiling in a watercolor style <s>"
      content span  "a photo of a sks toy"            (text before <c>, from the start or the previous marker)
      style span    "smiling in a watercolor style"   (text between <c> and <s>)
      clean prompt  "a photo of a sks toy smiling in a watercolor style"   (what the text encoder sees)

Rules (the paper states only the example; the rest is ours, chosen so that every prompt has one reading):
- Each marker tags the text between the previous marker (or the start) and itself. So `<s>` before `<c>` is
  allowed and unambiguous: "watercolor style <s> a dog <c>" has style span "watercolor style" and content span
  "a dog". Text after the last marker belongs to neither span; it is shared context ("... <s> at sunset").
- A span is stripped of surrounding spaces and of punctuation left over at its edges (", smiling" -> "smiling").
- Errors, each naming the prompt and the position: a marker given twice; a marker that tags no text ("<c><s>",
  or "<c>" at the very start); any other one-letter tag (`<x>`, `<C>`: markers are lowercase); closing tags
  (`</c>`: markers are single, not open/close pairs); A1111 LoRA tags (`<lora:name:0.8>`: lorafuse never reads
  LoRAs from prompts); and look-alikes, anything that reads as a marker but is not exactly `<c>` or `<s>`. A
  look-alike would otherwise silently drop a span and set its λ to 0 (or, read leniently, leave the user unsure
  which spellings count), so each is refused: spaces inside the brackets (`< c >`, `<s >`); an unclosed `<c` or
  a `c>` without its `<`; extra characters in the brackets
  (`<c/>`, `<c1>`, `<c:0.5>`, `<'c'>`, `<cs>`, `<content>`, `<style>`); doubled brackets (`<<c>>`, `<s>>`);
  other brackets (`[c]`, `{S}`, `(c)`, but not the plural "dog(s)"); any character drawn like an angle
  bracket or like c / s (`‹c›`, `＜ｃ＞`, `〈c〉`, `《s》`, `˂c˃`, `≤c>`, `<с>` with a Cyrillic es, `<ć>`: the
  scanner reads a skeleton of the prompt where each maps to its ASCII look), escaped brackets (`&lt;c&gt;`,
  `%3Cc%3E`); and a look-alike formed by the text left once the markers are cut out
  (`< <s>s` would show the text encoder "< s"). Longer angle-bracket words (`<cat-toy>`, textual-inversion
  placeholders) are ordinary prompt text and pass through unchanged.
- Clean prompt: markers removed, runs of whitespace collapsed to one space, no space before , . ; : ! ?
  and none at either end.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from lorafuse.errors import UserInputError

MARKERS = {"c": "content", "s": "style"}

# One scanner for everything bracket-like, so that every spelling of a marker gets one reading. The first
# alternative that matches at a position wins: A1111 tags, then one-letter tags (accepted only when exact:
# `_tag_letter` refuses spaces, closing slashes and other letters), then any other short bracketed group (text or a look-alike, decided by `_lookalike_group`),
# then the unbracketed look-alikes: other bracket kinds, an unclosed "<c", a "c>" without its "<".
_TOKEN = re.compile(
    r"(?P<a1111><\s*(?:lora|lyco|hypernet)\s*:[^>]*>)"
    r"|(?P<tag><\s*(?P<closing>/?)\s*(?P<letter>[A-Za-z])\s*>)"
    r"|(?P<group>(?:<|&lt;|%3C)(?P<inner>[^<>]{0,40}?)(?:>|&gt;|%3E))"
    r"|(?P<bracket>(?<!\w)[\[({]\s*[cCsS]\s*[\])}])"
    r"|(?P<unclosed><\s*/?\s*[cCsS](?![\w>-]))"
    r"|(?P<unopened>(?<![\w<])/?[cCsS]\s*>)",
    re.IGNORECASE,
)
# Characters that read as an ASCII angle bracket or as the letter c / s but are not one (`<с>` with a Cyrillic es,
# `❮c❯`, `《s》`, `˂c˃`, `<ć>`): the scanner reads the prompt through `_skeleton`, so one rule covers every script
# instead of a list of bracket spellings. Unicode's confusables table is not in the standard library; these are
# the letters of other scripts drawn exactly like c and s.
_CONFUSABLE = {"с": "c", "С": "C", "ϲ": "c", "Ϲ": "C", "ᴄ": "c", "ѕ": "s", "Ѕ": "S", "ꜱ": "s"}


def _skeleton_char(ch: str) -> str:
    if ch.isascii():
        return ch
    folded = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
    if len(folded) == 1 and folded.isascii():  # fullwidth ＜ｃ＞, accented ć, small forms
        return folded
    name = unicodedata.name(ch, "")
    if "ANGLE" in name or "ARROWHEAD" in name or "-THAN" in name:
        if "LEFT" in name or "LESS-THAN" in name:
            return "<"
        if "RIGHT" in name or "GREATER-THAN" in name:
            return ">"
    return _CONFUSABLE.get(ch, ch)


def _skeleton(prompt: str) -> str:
    """`prompt` with every look-alike of `<`, `>`, `c` and `s` replaced by the ASCII character, position by position."""
    return "".join(map(_skeleton_char, prompt))


# letters inside brackets that can only mean a marker; other words (`<cat-toy>`, `<sks>`) are prompt text
_MARKER_WORDS = {"c", "s", "cs", "sc", "content", "style"}
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_EDGE_PUNCT = " \t\n,.;:!?"


@dataclass(frozen=True)
class MarkedPrompt:
    """A parsed prompt. `content_span` / `style_span` are None when the marker is absent."""

    raw: str
    clean: str
    content_span: str | None
    style_span: str | None
    context: str  # text after the last marker (neither span)
    order: tuple[str, ...]  # markers in the order given, e.g. ("c", "s")

    @property
    def has_content(self) -> bool:
        return self.content_span is not None

    @property
    def has_style(self) -> bool:
        return self.style_span is not None


def normalise(text: str) -> str:
    """Collapse whitespace, drop spaces before punctuation and at the ends."""
    text = " ".join(text.split())
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text).strip()


def _span(text: str) -> str:
    return normalise(text).strip(_EDGE_PUNCT)


def _error(prompt: str, pos: int, problem: str) -> UserInputError:
    pointer = f"{prompt[:pos]}>>>{prompt[pos:]}"
    return UserInputError(f"prompt {prompt!r}: {problem} (at character {pos}: {pointer!r})")


def _lookalike_error(prompt: str, pos: int, token: str) -> UserInputError:
    return _error(
        prompt,
        pos,
        f"{token!r} looks like a marker but is not one; write exactly <c> after the content words "
        "and <s> after the style words",
    )


def _lookalike_group(m: re.Match) -> bool:
    """A bracketed group other than an exact tag: a look-alike when its letters spell a marker."""
    letters = re.sub(r"[^A-Za-z]", "", m.group("inner")).lower()
    return letters in _MARKER_WORDS


def _tag_letter(prompt: str, skeleton: str, m: re.Match) -> str:
    """The letter of an exact one-letter tag (`m` matched in the prompt's skeleton), or the error it deserves."""
    closing, letter = m.group("closing"), m.group("letter")
    before = skeleton[m.start() - 1] if m.start() else ""
    after = skeleton[m.end()] if m.end() < len(skeleton) else ""
    if before == "<" or after == ">":  # "<<c>>", "<s>>": the extra bracket would reach the text encoder
        token = prompt[m.start() - (before == "<") : m.end() + (after == ">")]
        raise _lookalike_error(prompt, m.start() - (before == "<"), token)
    original = prompt[m.start() : m.end()]
    if original != m.group(0):  # drawn like a tag, spelled with other characters ("<с>", "❮c❯")
        raise _lookalike_error(prompt, m.start(), original)
    if closing:
        raise _error(
            prompt, m.start(), f"{m.group(0)!r}: markers are single tags <c> and <s>, not open/close pairs"
        )
    if letter not in MARKERS:
        hint = " (markers are lowercase)" if letter.lower() in MARKERS else ""
        raise _error(prompt, m.start(), f"unknown marker {m.group(0)!r}{hint}; the markers are <c> and <s>")
    if m.group(0) != f"<{letter}>":  # "< c >": one spelling only, so no user wonders which ones count
        raise _error(prompt, m.start(), f"{m.group(0)!r} has spaces inside the brackets; write exactly <{letter}>")
    return letter


def _markers(prompt: str) -> list[re.Match]:
    """The exact marker tags of a prompt, in order; any other marker-like token is an error."""
    tags = []
    skeleton = _skeleton(prompt)
    for m in _TOKEN.finditer(skeleton):
        token = prompt[m.start() : m.end()]
        if m.group("a1111"):
            raise _error(prompt, m.start(), f"{token!r} is A1111 LoRA syntax; pass LoRAs as files, not in prompts")
        if m.group("tag"):
            _tag_letter(prompt, skeleton, m)
            tags.append(m)
        elif m.group("group") is None or _lookalike_group(m):
            raise _lookalike_error(prompt, m.start(), token)
    return tags


def parse_prompt(prompt: str) -> MarkedPrompt:
    """Split a marked prompt into spans and the clean prompt (see the module docstring for the rules)."""
    if not isinstance(prompt, str):
        raise UserInputError(f"a prompt must be a string, got {type(prompt).__name__}")
    spans: dict[str, str] = {}
    order: list[str] = []
    pieces: list[str] = []  # the prompt with markers cut out
    start = 0
    for m in _markers(prompt):
        letter = m.group("letter")
        if letter in spans:
            raise _error(prompt, m.start(), f"marker <{letter}> is given twice; each marker tags one span")
        text = _span(prompt[start : m.start()])
        if not text:
            raise _error(
                prompt,
                m.start(),
                f"marker <{letter}> tags no text: put the {MARKERS[letter]} words before it",
            )
        spans[letter] = text
        order.append(letter)
        pieces.append(prompt[start : m.start()])
        start = m.end()
    pieces.append(prompt[start:])
    clean = normalise(" ".join(pieces))
    if not clean:
        raise UserInputError(f"prompt {prompt!r} is empty once the markers are removed")
    if order:  # the text around the markers must not join into a new one ("< <s>s" reads "< s")
        for m in _TOKEN.finditer(_skeleton(clean)):
            if m.group("group") is None or _lookalike_group(m):
                raise UserInputError(
                    f"prompt {prompt!r}: once the markers are cut out it reads {clean!r}, where "
                    f"{clean[m.start() : m.end()]!r} "
                    "looks like a marker; write exactly <c> after the content words and <s> after the style words"
                )
    return MarkedPrompt(
        raw=prompt,
        clean=clean,
        content_span=spans.get("c"),
        style_span=spans.get("s"),
        context=_span(prompt[start:]),
        order=tuple(order),
    )


def strip_markers(prompt: str | Sequence[str]) -> str | list[str]:
    """The prompt(s) the text encoder sees: markers removed, spaces normalised. Validates like `parse_prompt`."""
    if isinstance(prompt, str):
        return parse_prompt(prompt).clean
    return [parse_prompt(p).clean for p in prompt]


def common_markers(prompts: Sequence[str]) -> MarkedPrompt:
    """The parse of the first prompt, after checking all prompts mark the same spans (one λ pair per run)."""
    if isinstance(prompts, str):
        return parse_prompt(prompts)
    if not prompts:
        raise UserInputError("no prompt given")
    parsed = [parse_prompt(p) for p in prompts]
    kinds = {(p.has_content, p.has_style) for p in parsed}
    if len(kinds) > 1:
        raise UserInputError(
            "these prompts mark different spans (some have <c> or <s>, others not), which would need different "
            f"aggregation weights within one batch: {list(prompts)}; sample them in separate runs"
        )
    return parsed[0]
