"""Captions as kohya sd-scripts treats them: comma-separated tags, the first `keep_tokens` fixed, the rest shuffled.

Per-sample randomness comes from a numpy Generator the caller derives from (seed, epoch, sample), so a resumed
run sees the same captions as an uninterrupted one.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from lorafuse.utils.inputs import read_text

CAPTION_EXTENSIONS = (".txt", ".caption")
SEPARATOR = ","


def split_tags(caption: str) -> list[str]:
    """'a, b ,, c' -> ['a', 'b', 'c']."""
    return [t.strip() for t in caption.split(SEPARATOR) if t.strip()]


def join_tags(tags: list[str]) -> str:
    return (SEPARATOR + " ").join(tags)


def read_caption(image: Path, extension: str) -> str | None:
    """The first non-empty line of the caption file beside `image` (kohya reads one line), or None."""
    path = image.with_suffix(extension)
    if not path.is_file():
        return None
    # a caption that does not decode is an error naming the file: guessing an encoding would train on mojibake
    for line in read_text(path, "caption file").splitlines():
        if line.strip():
            return line.strip()
    return None


def other_caption_file(image: Path, extension: str) -> Path | None:
    """A caption file with the other extension, to point out a wrong `caption_extension` in a warning."""
    for ext in CAPTION_EXTENSIONS:
        if ext != extension and image.with_suffix(ext).is_file():
            return image.with_suffix(ext)
    return None


def inject_trigger(caption: str, trigger: str | None) -> str:
    """Put `trigger` first unless the caption already holds it as whole words (kept where the user wrote it)."""
    if not trigger:
        return caption
    if re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
        return caption
    return join_tags([trigger, *split_tags(caption)]) if caption.strip() else trigger


def process_caption(
    caption: str,
    rng: np.random.Generator,
    *,
    shuffle: bool = False,
    keep_tokens: int = 0,
    tag_dropout_rate: float = 0.0,
    dropout_rate: float = 0.0,
) -> str:
    """One epoch's version of `caption`, in kohya's order: whole-caption dropout, then shuffle, then tag dropout.

    Whole-caption dropout returns "" (the unconditional prompt). Shuffle and tag dropout touch only the tags after
    the first `keep_tokens`; a caption left untouched keeps its original spelling.
    """
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return ""
    if not shuffle and tag_dropout_rate <= 0:
        return caption
    tags = split_tags(caption)
    fixed, flex = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle:
        flex = [flex[i] for i in rng.permutation(len(flex))]
    if tag_dropout_rate > 0:
        keep = rng.random(len(flex)) >= tag_dropout_rate
        flex = [t for t, k in zip(flex, keep, strict=True) if k]
    return join_tags(fixed + flex)
